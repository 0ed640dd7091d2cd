"""Shared helpers of the learning guards: run the real CLI (`python -m soho.train`) in a subprocess with its
own synthetic-data cache, and read the run's step history back from the committed train state."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def run_train(args: list[str], cache_dir: Path, env: dict[str, str] | None = None,
              timeout: float = 600) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "SOHO_CACHE_DIR": str(cache_dir), "PYTHONUNBUFFERED": "1", **(env or {})}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(key, None)  # a one-process run of its own, whatever the test process holds
    proc = subprocess.run([sys.executable, "-m", "soho.train", *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def run_history(storage: Path, name: str) -> list[dict[str, Any]]:
    """The step history up to the newest committed checkpoint, from the run's history log."""
    from orchestration.runtime.checkpoint import read_history

    states = sorted((storage / name / "checkpoints").glob("checkpoint_step_*/train_state.json"))
    assert states, f"no committed checkpoint under {storage / name}"
    return read_history(str(storage), name, upto=int(json.loads(states[-1].read_text())["step"]))
