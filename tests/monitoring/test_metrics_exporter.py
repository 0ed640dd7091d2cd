"""orchestration.runtime.metrics: values read back from the registry and from a real HTTP scrape."""

from __future__ import annotations

import math
import urllib.request

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from orchestration.runtime.metrics import DEFAULT_METRICS_PORT, HISTOGRAM_NAMES, METRIC_NAMES, SohoMetrics


def _fill(m: SohoMetrics) -> None:
    m.observe_step(
        {"mlm": 2.5, "mvm": 6.0, "itm": 0.7, "total": 9.2},
        samples=8,
        step_seconds=0.3,
        data_wait_seconds=0.05,
    )
    m.set_vd_health(
        {"usage_ratio": 0.8, "perplexity": 700.0, "dead_codes": 12, "decay": 0.99, "num_codes": 2048}
    )
    m.inc_nonfinite()
    m.observe_checkpoint(step=100, seconds=4.0, timestamp=1_700_000_000.0)
    m.set_bad_samples({"decode_error": 3})
    m.set_eval({("t2i", 1): 0.25, ("i2t", 5): 0.6})
    m.set_eval_figures(itm_accuracy=0.75, seconds=12.5)
    m.set_info({"preset": "tiny", "storage_path": "s3://bucket/x"})


def test_default_port_and_names_follow_contract() -> None:
    assert DEFAULT_METRICS_PORT == 9450
    assert len(set(METRIC_NAMES)) == len(METRIC_NAMES)
    for name in METRIC_NAMES:
        assert name.startswith("soho_"), name
    # Counters end in _total (the contract); the gauges/histograms must not pretend to be counters.
    counters = {n for n in METRIC_NAMES if n.endswith("_total")}
    assert counters == {
        "soho_train_steps_total",
        "soho_train_samples_total",
        "soho_data_wait_seconds_total",
        "soho_train_nonfinite_steps_total",
        "soho_data_bad_samples_total",
    }
    assert set(HISTOGRAM_NAMES) <= set(METRIC_NAMES)


def test_every_metric_name_is_exported_with_a_rank_label() -> None:
    m = SohoMetrics(rank=3)
    _fill(m)
    exported: set[str] = set()
    for family in m.registry.collect():
        for sample in family.samples:
            assert sample.labels.get("rank") == "3", sample
        name = family.name + ("_total" if family.type == "counter" else "")
        name = name + ("_info" if family.type == "info" else "")
        exported.add(name)
    assert exported == set(METRIC_NAMES)


def test_observe_step_accumulates() -> None:
    m = SohoMetrics(rank=1)
    assert m.value("soho_train_steps_total") == 0.0  # exists before the first step, for increase()
    m.observe_step({"mlm": 2.0, "total": 5.0}, samples=16, step_seconds=0.2, data_wait_seconds=0.05)
    m.observe_step(
        # itc: runs with pretrain.itc_weight > 0
        {"mlm": 1.5, "mvm": 3.0, "itm": 0.5, "itc": 0.75, "total": 5.0},
        samples=16,
        step_seconds=4.0,
        data_wait_seconds=0.25,
    )
    assert m.value("soho_train_steps_total") == 2.0
    assert m.value("soho_train_loss", task="itc") == 0.75
    assert m.value("soho_train_samples_total") == 32.0
    assert m.value("soho_data_wait_seconds_total") == pytest.approx(0.3)
    assert m.value("soho_train_loss", task="mlm") == 1.5
    assert m.value("soho_train_loss", task="mvm") == 3.0
    assert m.value("soho_train_loss", task="itm") == 0.5
    assert m.value("soho_train_step_duration_seconds_count") == 2.0
    assert m.value("soho_train_step_duration_seconds_sum") == pytest.approx(4.2)
    assert m.value("soho_train_step_duration_seconds_bucket", le="0.25") == 1.0
    assert m.value("soho_train_step_duration_seconds_bucket", le="5.0") == 2.0


def test_observe_step_rejects_bad_input_naming_it() -> None:
    m = SohoMetrics()
    with pytest.raises(ValueError, match="mlm_acc"):
        m.observe_step({"mlm_acc": 0.1}, samples=1, step_seconds=0.1, data_wait_seconds=0.0)
    with pytest.raises(ValueError, match="step_seconds"):
        m.observe_step({"mlm": 1.0}, samples=1, step_seconds=-1.0, data_wait_seconds=0.0)
    with pytest.raises(ValueError, match="samples"):
        m.observe_step({"mlm": 1.0}, samples=float("nan"), step_seconds=0.1, data_wait_seconds=0.0)
    # Nothing was half-recorded by the rejected calls.
    assert m.value("soho_train_steps_total") == 0.0
    # A non-finite loss is exported as-is: the loss panel must show it.
    m.observe_step({"total": float("nan")}, samples=1, step_seconds=0.1, data_wait_seconds=0.0)
    assert math.isnan(m.value("soho_train_loss", task="total"))


def test_vd_health_checkpoint_nonfinite_eval_info() -> None:
    m = SohoMetrics(rank=0)
    _fill(m)
    assert m.value("soho_vd_usage_ratio") == 0.8
    assert m.value("soho_vd_perplexity") == 700.0
    assert m.value("soho_vd_dead_codes") == 12.0
    assert m.value("soho_vd_ema_decay") == 0.99
    assert m.value("soho_vd_num_codes") == 2048.0
    assert m.value("soho_train_nonfinite_steps_total") == 1.0
    assert m.value("soho_checkpoint_last_step") == 100.0
    assert m.value("soho_checkpoint_last_timestamp_seconds") == 1_700_000_000.0
    assert m.value("soho_checkpoint_save_duration_seconds_count") == 1.0
    assert m.value("soho_checkpoint_save_duration_seconds_sum") == 4.0
    assert m.value("soho_eval_recall", direction="t2i", k="1") == 0.25
    assert m.value("soho_eval_recall", direction="i2t", k="5") == 0.6
    assert (m.value("soho_eval_itm_accuracy"), m.value("soho_eval_seconds")) == (0.75, 12.5)
    # Only low-cardinality keys become labels: the storage URL must not.
    assert m.value("soho_run_info", preset="tiny") == 1.0
    info = [s for f in m.registry.collect() if f.name == "soho_run" for s in f.samples]
    assert info[0].labels == {"rank": "0", "preset": "tiny"}
    with pytest.raises(ValueError, match="perplexity"):
        m.set_vd_health({"usage_ratio": 0.5, "dead_codes": 1, "decay": 0.99})
    with pytest.raises(ValueError, match="direction"):
        m.set_eval({("x2y", 1): 0.1})


def test_checkpoint_timestamp_defaults_to_now() -> None:
    import time

    m = SohoMetrics()
    before = time.time()
    m.observe_checkpoint(step=7, seconds=0.5)
    after = time.time()
    assert before <= m.value("soho_checkpoint_last_timestamp_seconds") <= after


def test_bad_samples_counter_follows_cumulative_counts_monotonically() -> None:
    m = SohoMetrics(rank=2)
    m.set_bad_samples({"decode_error": 3, "empty_caption": 1})
    m.set_bad_samples({"decode_error": 5, "empty_caption": 1})
    assert m.value("soho_data_bad_samples_total", reason="decode_error") == 5.0
    assert m.value("soho_data_bad_samples_total", reason="empty_caption") == 1.0
    # Same totals again: no double counting.
    m.set_bad_samples({"decode_error": 5, "empty_caption": 1})
    assert m.value("soho_data_bad_samples_total", reason="decode_error") == 5.0
    # Loader rebuilt (totals restart at 2): the counter never decreases, the 2 new ones are added.
    m.set_bad_samples({"decode_error": 2})
    assert m.value("soho_data_bad_samples_total", reason="decode_error") == 7.0
    m.set_bad_samples({"decode_error": 4})
    assert m.value("soho_data_bad_samples_total", reason="decode_error") == 9.0
    with pytest.raises(ValueError, match="too_small"):
        m.set_bad_samples({"too_small": -1})


def test_two_workers_in_one_process_do_not_collide() -> None:
    a, b = SohoMetrics(rank=0), SohoMetrics(rank=1)
    a.observe_step({"total": 1.0}, samples=4, step_seconds=0.1, data_wait_seconds=0.0)
    assert a.value("soho_train_samples_total") == 4.0
    assert b.value("soho_train_samples_total") == 0.0
    shared = CollectorRegistry()
    SohoMetrics(rank=0, registry=shared)
    with pytest.raises(ValueError):  # the same names twice in one registry is a programming error
        SohoMetrics(rank=1, registry=shared)


def test_http_scrape_returns_the_values() -> None:
    m = SohoMetrics(rank=4)
    _fill(m)
    port = m.start_http_server(0, addr="127.0.0.1")
    try:
        assert port > 0 and m.port == port
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(body)
            for s in fam.samples
        }
        assert samples[("soho_train_loss", (("rank", "4"), ("task", "mlm")))] == 2.5
        assert samples[("soho_vd_perplexity", (("rank", "4"),))] == 700.0
        assert samples[("soho_train_steps_total", (("rank", "4"),))] == 1.0
        assert samples[("soho_data_bad_samples_total", (("rank", "4"), ("reason", "decode_error")))] == 3.0
        assert samples[("soho_train_step_duration_seconds_count", (("rank", "4"),))] == 1.0
        with pytest.raises(RuntimeError, match="already running"):
            m.start_http_server(0, addr="127.0.0.1")
        # A second worker asking for the same port gets an error naming the address.
        other = SohoMetrics(rank=5)
        with pytest.raises(OSError, match=f"127.0.0.1:{port}"):
            other.start_http_server(port, addr="127.0.0.1")
    finally:
        m.stop_http_server()
    assert m.port is None
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
