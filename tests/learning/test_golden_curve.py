"""Golden loss curve of the tiny preset: the first steps of a fixed-seed run must reproduce the losses
stored in tests/assets/golden_tiny_loss.json. Anything that changes what is trained (model init, masking,
ITM negatives, VD update, data order, lr schedule, loss definitions) moves the curve and fails here until the
file is regenerated on purpose:

    SOHO_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/learning/test_golden_curve.py

Every option that shapes the curve is pinned below, so a change of a RunConfig default does not move it
(the transformer init range too: the tiny preset's default is moving from BERT's 0.02 to 0.2).
The tolerance absorbs float reassociation from the CPU thread count (measured: see the asset's `noise`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests.learning.conftest import REPO, run_history, run_train

pytestmark = [pytest.mark.slow, pytest.mark.integration]

GOLDEN = REPO / "tests" / "assets" / "golden_tiny_loss.json"
KEYS = ("loss", "mlm", "mvm", "itm")
STEPS = 30
FLAGS = [
    "--preset", "tiny", "--launcher", "local", "--num-workers", "1", "--zero-stage", "0",
    "--precision", "fp32", "--synthetic-pairs", "256", "--synthetic-captions", "1", "--image-size", "64",
    "--max-text-len", "48", "--micro-batch-size", "8", "--grad-accum", "1", "--lr", "1e-3",
    "--weight-decay", "0.01",
    "--adam-beta1", "0.9", "--adam-beta2", "0.98", "--grad-clip", "1.0", "--warmup-steps", "10",
    "--lr-schedule", "cosine", "--min-lr-ratio", "0.1", "--freeze-backbone-steps", "5",
    "--freeze-backbone-epochs", "0", "--loader-workers", "0", "--seed", "0", "--max-steps", str(STEPS),
    "--checkpoint-every", "1000", "--metrics-port", "-1", "--log-every", "1000", "--no-final-eval",
    "--model-overrides", "vd.restart_dead_codes=true,vd.dead_code_window=10,pretrain.mvm_prob=0.5,"
    "transformer.initializer_range=0.2",
]
# Absolute tolerance per loss value over the first COMPARED steps. Measured with the 0.2 init: the curve
# written with 2 CPU threads and rerun with OMP_NUM_THREADS=1 agrees to 1e-5 (the history's rounding) for
# steps 1-13, then float reassociation flips a discrete choice (a VD assignment or dead-code restart) and
# the two runs drift apart by up to 0.6 by step 18. So the first 12 steps are compared exactly (a different
# mask draw, init, VD update or lr schedule moves them by far more than 1e-3); the rest of the 30-step run
# (kept so the lr schedule is the pinned one) only has to be a falling curve.
ATOL = 1e-3
COMPARED = 12


def test_tiny_preset_reproduces_golden_loss_curve(tmp_path: Path) -> None:
    run_train([*FLAGS, "--storage-path", str(tmp_path), "--run-name", "golden"], tmp_path / "cache")
    history = run_history(tmp_path, "golden")
    assert [r["step"] for r in history] == list(range(1, STEPS + 1))
    curve = {k: [r[k] for r in history] for k in KEYS}
    assert all(torch.isfinite(torch.tensor(v)).all() for v in curve.values())
    if os.environ.get("SOHO_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps({
            "about": "tiny preset, first steps of a fixed-seed run; regenerate with "
                     "SOHO_UPDATE_GOLDEN=1 pytest tests/learning/test_golden_curve.py",
            "flags": FLAGS, "torch": torch.__version__, "atol": ATOL,
            "compared_steps": COMPARED,
            "measured_thread_noise": "max |diff| 1e-5 for steps 1-13 between 2 threads and "
                                     "OMP_NUM_THREADS=1; up to 0.6 after a discrete VD flip at step 14+",
            "curve": curve,
        }, indent=1) + "\n")
        pytest.skip(f"golden curve rewritten: {GOLDEN}")
    golden = json.loads(GOLDEN.read_text())
    assert golden["flags"] == FLAGS, "the pinned flags changed: regenerate the golden curve on purpose"
    for key in KEYS:
        want, got = torch.tensor(golden["curve"][key][:COMPARED]), torch.tensor(curve[key][:COMPARED])
        assert want.shape == got.shape, key
        worst = float((want - got).abs().max())
        step = int((want - got).abs().argmax()) + 1
        assert worst <= ATOL, f"{key} loss left the golden curve at step {step}: |diff| {worst:.4g} > {ATOL}"
    # The curve itself is a learning curve: the total loss falls over the first steps.
    assert sum(curve["loss"][-5:]) < sum(curve["loss"][:5])
