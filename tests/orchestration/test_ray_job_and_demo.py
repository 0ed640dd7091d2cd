"""The two ways users start training: `ray job submit -- python -m soho.train` against a `ray start` cluster,
and `make demo` (the embedded default, no arguments)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.orchestration.conftest import FAST_FLAGS, REPO, free_port, last_json

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.ray]

VENV_BIN = str(Path(sys.executable).parent)


def test_ray_job_submit_succeeds_with_a_checkpoint(tmp_path: Path, synth_manifest: str) -> None:
    ray = str(Path(VENV_BIN) / "ray")
    # Token authentication on (as in the k8s manifests: an unauthenticated job API is remote code execution),
    # with this test's own token for the head and for the job CLI.
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}", "RAY_USAGE_STATS_ENABLED": "0",
           "DS_ACCELERATOR": "cpu", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    for var in ("RAY_ADDRESS", "RAY_AUTH_TOKEN"):
        env.pop(var, None)
    gcs_port, dash_port = free_port(), free_port()
    temp_dir = Path("/tmp") / f"rayjob-{os.getpid()}"  # short: Ray's socket paths must stay < 108 bytes
    # --block keeps the head in the foreground: terminating this one process stops exactly the Ray that
    # this test started (never `ray stop`, which would stop every Ray on the machine).
    head = subprocess.Popen(
        [ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}", "--include-dashboard=true",
         "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash_port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            probe = subprocess.run([ray, "job", "list", "--address", address], env=env, capture_output=True,
                                   text=True, timeout=60)
            if probe.returncode == 0:
                break
            assert time.monotonic() < deadline, (tmp_path / "head.log").read_text()[-3000:] + probe.stderr[-2000:]
            time.sleep(2)
        storage = tmp_path / "runs"
        sub_id = f"soho-test-{os.getpid()}"
        submit = subprocess.run(
            [ray, "job", "submit", "--address", address, "--submission-id", sub_id, "--working-dir", str(REPO),
             "--", "python", "-m", "soho.train", *FAST_FLAGS, "--data", synth_manifest, "--storage-path",
             str(storage), "--run-name", "job", "--num-workers", "1", "--max-steps", "3",
             "--checkpoint-every", "3", "--metrics-port", "-1"],
            env=env, capture_output=True, text=True, timeout=500)
        status = subprocess.run([ray, "job", "status", "--address", address, sub_id], env=env,
                                capture_output=True, text=True, timeout=60)
        # `ray job status` reports JobStatus.SUCCEEDED as "Job '<id>' succeeded"
        assert f"Job '{sub_id}' succeeded" in status.stdout, (
            submit.stdout[-4000:] + submit.stderr[-3000:] + status.stdout)
        assert submit.returncode == 0
        summary = last_json(submit.stdout)
        assert summary["steps"] == 3
        ckpt = storage / "job" / "checkpoint_step_00000003"
        assert (ckpt / "train_state.json").is_file() and (ckpt / "rank-00000.json").is_file()
        assert json.loads((ckpt / "train_state.json").read_text())["step"] == 3
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_make_demo_runs_the_embedded_default_and_the_loss_falls(tmp_path: Path) -> None:
    """`make demo` = `python -m soho.train` with no arguments; only where it writes is redirected."""
    env = {**os.environ, "SOHO_STORAGE_PATH": str(tmp_path / "runs"), "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(["make", "-C", str(REPO), "demo"], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = last_json(proc.stdout)
    assert summary["preset"] == "tiny" and summary["world_size"] == 2 and summary["zero_stage"] == 2
    assert summary["steps"] >= 200
    assert summary["total_loss_fell"] is True
    assert summary["losses"]["loss"]["last"] < summary["losses"]["loss"]["first"]
    run_dir = tmp_path / "runs" / "soho-tiny"
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["losses"] == summary["losses"]
    assert (run_dir / "loss_curve.png").stat().st_size > 10_000
    assert (run_dir / "final_model" / "config.json").is_file()
    assert sorted(p.name for p in run_dir.glob("checkpoint_step_*"))[-1] == f"checkpoint_step_{summary['steps']:08d}"
