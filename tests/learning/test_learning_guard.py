"""Guard against regressions that silently stop learning: a fixed-seed run of the shipped CPU recipe
(configs/synthetic_cpu.yaml, half its steps, through the real CLI), then the held-out scenes it never
trained on (orchestration.heldout_eval): held-out ITM accuracy >= 0.8 (chance 0.5, not one-sided), VD usage
>= 0.5 with no collapse during the run, losses falling. The run is made once per module; the tests read it.
Before the recipe had the ITM interaction head this run stayed at chance (0.49-0.51 through 2,000 steps,
docs/RESULTS.md); measured with it: see STEPS.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.learning.conftest import REPO, run_history, run_train

pytestmark = [pytest.mark.slow, pytest.mark.integration]

CONFIG = REPO / "configs" / "synthetic_cpu.yaml"
STEPS = 1000  # ~5-6 min on 2 quiet cores; the recipe's held-out ITM is 0.7-0.8 at 500-750 steps, 0.8+ at 1000
PAIRS = 8192  # the recipe's own data: with fewer pairs 1000 steps are many epochs and held-out accuracy drops


@pytest.fixture(scope="module")
def short_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from orchestration.config import RunConfig, load_yaml
    from orchestration.heldout_eval import HeldoutConfig, evaluate_model, prepare_heldout
    from soho import SohoForPretraining

    tmp = tmp_path_factory.mktemp("guard")
    cache = tmp / "cache"
    run = RunConfig.from_dict({**load_yaml(CONFIG), "synthetic_pairs": PAIRS}, source=str(CONFIG))
    hcfg = HeldoutConfig.from_run_config(run, num_candidates=100, cache_dir=str(cache))
    images, data_url = prepare_heldout(hcfg)
    run_train(["--config", str(CONFIG), "--max-steps", str(STEPS), "--synthetic-pairs", str(PAIRS),
               "--data", data_url, "--eval-every", "0", "--storage-path", str(tmp), "--run-name", "guard",
               "--metrics-port", "-1", "--checkpoint-every", str(STEPS)],
              cache, timeout=1200)  # generous: a busy shared machine runs 3-5x slower than a quiet one
    model = SohoForPretraining.from_pretrained(str(tmp / "guard" / "final_model"))
    return {"history": run_history(tmp, "guard"), "heldout": evaluate_model(model, hcfg, images, retrieval=False)}


def test_losses_fall_and_codebook_stays_healthy(short_run: dict[str, Any]) -> None:
    history, heldout = short_run["history"], short_run["heldout"]
    assert [r["step"] for r in history] == list(range(1, STEPS + 1))
    first = sum(r["loss"] for r in history[:10]) / 10
    last = sum(r["loss"] for r in history[-10:]) / 10
    assert last < first - 3.0, (first, last)  # measured: ~16 -> ~9
    mlm_first = sum(r["mlm"] for r in history[:10]) / 10
    mlm_last = sum(r["mlm"] for r in history[-10:]) / 10
    assert mlm_last < 0.5 * mlm_first, (mlm_first, mlm_last)  # ln(30522) = 10.3 -> the caption grammar
    assert heldout["vd_usage_ratio"] >= 0.5, heldout
    assert heldout["vd_perplexity"] >= 0.25 * heldout["vd_num_codes"], heldout
    # no collapse while training: once the dead-code restarts have run (window 20), usage stays up
    assert min(r["vd_usage"] for r in history[40:]) >= 0.5, min(r["vd_usage"] for r in history[40:])


def test_heldout_itm_accuracy_clearly_above_chance(short_run: dict[str, Any]) -> None:
    heldout = short_run["heldout"]
    assert heldout["itm_acc"] >= 0.8, heldout  # chance: 0.5 on balanced held-out pairs
    assert heldout["itm_acc_pos"] >= 0.6 and heldout["itm_acc_neg"] >= 0.6, heldout  # not one-sided
