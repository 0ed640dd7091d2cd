"""Suite-wide fixtures: repository paths and the shared pre-training run. Nothing here needs anything outside
the repository (the k8s CRD schemas are optional: tests/k8s/manifests.py, ``$SOHO_CRD_SCHEMAS``)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# Tests must never reach a hub or a non-loopback address.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


RECIPE_STEPS = 1000  # ~7.5 min on one core; held-out ITM 0.975, paraphrases 0.965 (seed 0, measured)
RECIPE_PAIRS = 8192  # the recipe's own data (fewer pairs would make 1000 steps many epochs)
RECIPE_TIMEOUT_S = 2400  # generous: a busy shared machine runs 3-5x slower than a quiet one
_recipe: dict[str, Any] = {}  # the background run started at collection (see pytest_collection_modifyitems)


def _uses_recipe(item: pytest.Item) -> bool:
    return "recipe_run" in getattr(item, "fixturenames", ())


@pytest.hookimpl(trylast=True)  # after -k / -m deselection: start the run only for a selection that uses it
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
                                  ) -> None:
    """The shared recipe run (one core for ~7.5 minutes) trains in the background while the rest of the
    suite runs: it starts here, once the selection is known to need it, and the tests that use it go last
    (in their collected order), so that by the time they run it has finished or nearly. On a 2-core machine
    the suite alone leaves much of the second core idle; run in line, the fixture cost ~380 s of wall time."""
    users = [it for it in items if _uses_recipe(it)]
    if not users:
        return
    items[:] = [it for it in items if not _uses_recipe(it)] + users
    if config.option.collectonly:
        return
    # pytest's own temporary-path factory (a hook has no fixtures): the run's files live with the session's.
    _recipe.update(_start_recipe(config._tmp_path_factory.mktemp("recipe")))


def _start_recipe(tmp: Path) -> dict[str, Any]:
    """Prepare the held-out data (in this process) and start configs/synthetic_cpu.yaml for RECIPE_STEPS
    steps through the real CLI in a subprocess."""
    from configcli import load_yaml
    from orchestration.pretrain.config import RunConfig
    from orchestration.pretrain.heldout_eval import HeldoutConfig, heldout_data_dir, prepare_heldout
    from tests.learning.conftest import start_train

    config = REPO_ROOT / "configs" / "synthetic_cpu.yaml"
    cache = tmp / "cache"
    run = RunConfig.from_dict({**load_yaml(config), "synthetic_pairs": RECIPE_PAIRS}, source=str(config))
    hcfg = HeldoutConfig.from_run_config(run, num_candidates=100, cache_dir=str(cache))
    images, data_url = prepare_heldout(hcfg)
    log = tmp / "train.log"
    proc = start_train(["--config", str(config), "--max-steps", str(RECIPE_STEPS),
                        "--synthetic-pairs", str(RECIPE_PAIRS), "--data", data_url, "--eval-every", "0",
                        "--storage-path", str(tmp), "--run-name", "recipe",
                        "--metrics-port", "-1", "--checkpoint-every", str(RECIPE_STEPS)], cache, log,
                       # one thread: it shares the machine with the suite (two threads would stall on each
                       # other whenever a test holds the second core); the recipe's figures were measured so
                       env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    return {"proc": proc, "log": log, "tmp": tmp, "started": time.monotonic(), "heldout_cfg": hcfg,
            "heldout_images": images, "data_root": heldout_data_dir(hcfg)}


def pytest_sessionfinish(session: pytest.Session) -> None:
    proc = _recipe.get("proc")
    if proc is not None and proc.poll() is None:  # the session ended early (-x, ^C): do not leave it running
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def recipe_run() -> dict:
    """One fixed-seed run of configs/synthetic_cpu.yaml (RECIPE_STEPS steps, through the real CLI in a
    subprocess, started in the background at collection), shared by the learning guard and the
    "pre-training helps" downstream test. Returns the final model directory, the step history, the held-out
    images and config, and the synthetic data root (its ``downstream/`` holds the task files of the same
    seed)."""
    from tests.learning.conftest import run_history

    assert _recipe, "recipe_run: the background run was not started at collection"
    proc: subprocess.Popen = _recipe["proc"]
    left = RECIPE_TIMEOUT_S - (time.monotonic() - _recipe["started"])
    try:
        rc = proc.wait(timeout=max(1.0, left))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"the recipe run took over {RECIPE_TIMEOUT_S} s; its log ends: "
                    f"{_recipe['log'].read_text(errors='replace')[-4000:]}")
    assert rc == 0, f"the recipe run failed (exit {rc}): {_recipe['log'].read_text(errors='replace')[-8000:]}"
    tmp = _recipe["tmp"]
    return {"model_dir": tmp / "recipe" / "final_model", "history": run_history(tmp, "recipe"),
            "heldout_cfg": _recipe["heldout_cfg"], "heldout_images": _recipe["heldout_images"],
            "data_root": _recipe["data_root"], "steps": RECIPE_STEPS}
