"""Fixtures for the orchestration tests: tiny synthetic shards, subprocess runs of the CLI, one Ray
session."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable

# Tiny and fast: 64 px images (4×4 visual tokens at stride 16), small batches.
FAST_FLAGS = ["--preset", "tiny", "--image-size", "64", "--micro-batch-size", "4", "--max-text-len", "24",
              "--warmup-steps", "2", "--log-every", "1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def synth_manifest(tmp_path_factory: pytest.TempPathFactory) -> str:
    """128 synthetic pairs at 64 px in 16 shards (enough for 2 ranks × 2 loader workers)."""
    from data_pipeline.synth import make_synthetic

    out = tmp_path_factory.mktemp("synth")
    result = make_synthetic(str(out), num=128, seed=3, heldout=0, image_size=64)
    manifest = result.get("pretrain_manifest") or str(out / "pretrain" / "manifest.json")
    assert Path(manifest).is_file()
    return str(manifest)


def run_cli(args: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None,
            timeout: float = 400, torchrun_procs: int = 0) -> subprocess.CompletedProcess:
    """``python -m soho.train ARGS`` (optionally under torchrun) in a fresh process; output captured."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "DS_ACCELERATOR": "cpu", **(env or {})}
    if torchrun_procs:
        cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node", str(torchrun_procs), "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), "-m", "soho.train", *args]
    else:
        cmd = [PY, "-m", "soho.train", *args]
    return subprocess.run(cmd, cwd=cwd or REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def last_json(stdout: str) -> dict[str, Any]:
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(f"no JSON summary line in output:\n{stdout[-3000:]}")


def rank_records(ckpt_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(ckpt_dir.glob("rank-*.json"))]
