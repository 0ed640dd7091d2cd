"""benchmarks/orchestration_overhead.py: the workload guard refuses runs that did different work, and the
summary pairs each variant with the bare loop of the same round (no training here: milliseconds)."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from orchestration.pretrain.config import RunConfig
from tests.orchestration.conftest import REPO


def _bench():
    spec = importlib.util.spec_from_file_location("orchestration_overhead",
                                                  REPO / "benchmarks" / "orchestration_overhead.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_workload_guard_names_what_differs():
    bench = _bench()
    cfg = RunConfig.of(launcher="local", micro_batch_size=8, max_steps=40, metrics_port=-1)
    good = {"steps": 40, "records": 40, "samples_seen": 320, "nonfinite_steps": 0}
    bench.check_workload("zero2", good, cfg)
    bench.check_workload("bare", {"steps": 40, "samples_seen": 320, "shapes": [(8, 8, 3)]}, cfg)
    bad = [({**good, "steps": 39}, "zero2: ran"), ({**good, "records": 20}, "zero2: ran"),
           ({**good, "samples_seen": 312}, "saw 312 samples, expected 40 × 8"),
           ({**good, "nonfinite_steps": 2}, "2 non-finite steps"),
           ({"steps": 40, "samples_seen": 320, "shapes": [(7, 7, 3), (8, 8, 3)]}, "batch shapes")]
    for work, message in bad:
        with pytest.raises(AssertionError, match=message):
            bench.check_workload("zero2", work, cfg)


def test_summary_is_median_of_rounds_and_paired_ratios():
    bench = _bench()
    per_round = {"bare": [10.0, 5.0, 8.0], "zero2": [9.0, 5.0, 8.8], "ray": [11.0, 4.0, 8.0]}
    table = bench.summarise(per_round)
    assert table["bare"] == {"median": 8.0, "min": 5.0, "max": 10.0, "ratio": 1.0, "ratio_min": 1.0,
                             "ratio_max": 1.0}
    # per-round ratios 0.9, 1.0, 1.1: a slow round (5.0) slows both sides of its own ratio
    assert table["zero2"]["median"] == 8.8 and (table["zero2"]["min"], table["zero2"]["max"]) == (5.0, 9.0)
    assert table["zero2"]["ratio"] == pytest.approx(1.0)
    assert (table["zero2"]["ratio_min"], table["zero2"]["ratio_max"]) == pytest.approx((0.9, 1.1))
    assert table["ray"]["ratio"] == pytest.approx(1.0)
    assert (table["ray"]["ratio_min"], table["ray"]["ratio_max"]) == pytest.approx((0.8, 1.1))
    assert bench.steady([1.0, 100.0, 3.0, 5.0, 4.0], skip=2) == 4.0


@pytest.mark.parametrize(("argv", "message"), [(["--rounds", "2"], "at least 3 rounds"),
                                              (["--steps", "10", "--skip", "8"], "--skip 8 must leave")])
def test_refuses_too_few_rounds_or_measured_steps(monkeypatch, capsys, argv, message):
    bench = _bench()
    monkeypatch.setattr(sys, "argv", ["orchestration_overhead.py", *argv])
    with pytest.raises(SystemExit) as exc:
        bench.main()
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
