"""The two ways users start training: `ray job submit -- python -m soho.train` against a `ray start` cluster,
and `make demo` (the embedded default, no arguments)."""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from orchestration.pretrain.launch import in_ray_working_dir_copy
from orchestration.runtime.checkpoint import read_history
from tests.orchestration.conftest import FAST_FLAGS, REPO, free_port, last_json

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.ray]

VENV_BIN = str(Path(sys.executable).parent)


def documented_submit_command() -> str:
    """The `ray job submit` line of orchestration/README.md, exactly as a user copies it."""
    text = (REPO / "orchestration" / "README.md").read_text()
    lines = {line.split("  #")[0].strip() for line in text.splitlines()
             if " ray job submit --working-dir ." in line}
    assert len(lines) == 1, lines  # the README shows one command, in every place it shows it
    return lines.pop()


def _project_copy(dest: Path) -> Path:
    """The user's checkout: the packages a job needs (what `--working-dir .` uploads, minus caches)."""
    for pkg in ("soho", "orchestration", "data_pipeline", "configs"):
        shutil.copytree(REPO / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(REPO / ".gitignore", dest / ".gitignore")  # Ray's upload skips what git ignores: /runs/
    return dest


def _grep_tree(root: Path, needles: list[bytes]) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                data = path.read_bytes()
            except OSError:
                continue
            hits += [f"{path}: {n[:12]!r}..." for n in needles if n in data]
    return hits


def _jobs_api(port: int, token: str | None, deadline_s: float = 0) -> int:
    """HTTP status of the job API's job list, with or without the bearer token; retried until it answers."""
    deadline = time.monotonic() + deadline_s
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    while True:
        try:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/api/jobs/", headers=headers)
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as err:
            if err.code < 500 or time.monotonic() > deadline:
                return err.code
        except OSError:
            if time.monotonic() > deadline:
                return 0
        time.sleep(1)


def _submit(line: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run a `ray job submit` command line; a head whose job agent has not registered yet (its dashboard
    already answers) refuses with "No available agent ... try again later": do what it says."""
    deadline = time.monotonic() + 120
    while True:
        proc = subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=500)
        if "No available agent to submit job" not in proc.stdout + proc.stderr or time.monotonic() > deadline:
            return proc
        time.sleep(3)


def test_documented_ray_job_submit_runs_and_leaks_no_secret(tmp_path: Path, synth_manifest: str) -> None:
    """`ray start --head` with a token (so Ray 2.60 turns token auth on), then the README's `ray job submit`
    line verbatim (this test's tiny-run flags appended; later flags win), from a copy of the project. The
    export must be where the README says (./runs/soho-tiny/final_model), nothing may land in Ray's
    working-dir copy, and the cluster's distinctive AWS credentials must reach no output, log or run file."""
    ray = str(Path(VENV_BIN) / "ray")
    command = documented_submit_command()
    assert command.startswith("RAY_AUTH_MODE=token ray job submit --working-dir . -- python -m soho.train")
    token = tmp_path / "auth_token"  # what `ray get-auth-token --generate` writes, kept out of ~/.ray
    token.write_text(secrets.token_hex(32))
    tag = secrets.token_hex(8)
    creds = {"AWS_ACCESS_KEY_ID": f"AKIASOHO{tag.upper()}", "AWS_SECRET_ACCESS_KEY": f"soho-secret-{tag}",
             "AWS_SESSION_TOKEN": f"soho-session-{tag}"}
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}", "RAY_USAGE_STATS_ENABLED": "0",
           "DS_ACCELERATOR": "cpu", "RAY_AUTH_TOKEN_PATH": str(token), **creds}
    for var in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE", "SOHO_STORAGE_PATH"):
        env.pop(var, None)
    gcs_port, dash_port = free_port(), free_port()
    temp_dir = Path("/tmp") / f"rayjob-{os.getpid()}"  # short: Ray's socket paths must stay < 108 bytes
    # --block keeps the head in the foreground: terminating this one process stops exactly the Ray that
    # this test started (never a bare `ray stop`, which would stop every Ray on the machine).
    head = subprocess.Popen(
        [ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}", "--include-dashboard=true",
         # the job API needs the head's dashboard agent: its fixed default port (52365) may be held by
         # another Ray on this machine, and then every submit answers "No available agent"
         f"--dashboard-agent-listen-port={free_port()}",
         "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    client = {**env, "RAY_ADDRESS": f"http://127.0.0.1:{dash_port}"}
    project = _project_copy(tmp_path / "project")
    try:
        # Ready when the job API answers a request that carries the token (plain HTTP: no CLI start-up per
        # probe); without the token it is refused, which is why the README's line sets RAY_AUTH_MODE=token
        # (without it the CLI sends no token: "Missing authentication token").
        ready = _jobs_api(dash_port, token.read_text(), deadline_s=120)
        assert ready == 200, (ready, (tmp_path / "head.log").read_text()[-3000:])
        assert _jobs_api(dash_port, None) in (401, 403)

        tiny = [*FAST_FLAGS, "--data", synth_manifest, "--num-workers", "1", "--max-steps", "3",
                "--checkpoint-every", "3", "--metrics-port", "-1"]
        submit = _submit(f"{command} {shlex.join(tiny)}", project, client)
        out = submit.stdout + submit.stderr
        job_id = re.search(r"Job '(raysubmit_\w+)' submitted successfully", out)
        assert job_id, out[-4000:]
        # `ray job submit` tails the job's log to its end and then reports the final status.
        assert f"Job '{job_id.group(1)}' succeeded" in out, out[-5000:]
        assert submit.returncode == 0
        summary = last_json(submit.stdout)
        assert summary["steps"] == 3
        # Where the README says: ./runs/<run name>/ of the folder the command ran in.
        run_dir = project / "runs" / "soho-tiny"
        assert summary["run_dir"] == str(run_dir)
        assert json.loads((run_dir / "final_model" / "config.json").read_text())
        assert json.loads((run_dir / "summary.json").read_text())["steps"] == 3
        state = json.loads((run_dir / "checkpoint_step_00000003" / "train_state.json").read_text())
        assert state["step"] == 3
        copies = list(temp_dir.glob("session_*/runtime_resources/working_dir_files/*"))
        assert copies and not [p for c in copies for p in c.rglob("*") if p.name in ("runs", "final_model")]
        # launch.check_run_paths refuses a relative --storage-path inside these copies, as this Ray lays them
        # out (the refusal itself is unit-tested in test_launch_guards.py: a second job would cost ~15 s).
        assert all(in_ray_working_dir_copy(str(c)) for c in copies)
        assert not in_ray_working_dir_copy(str(project))
        # The credentials live in the cluster's environment only: no output, log or run file shows them.
        needles = [v.encode() for v in creds.values()]
        assert not [n for n in needles if n in out.encode()]
        assert _grep_tree(project / "runs", needles) == []
        assert _grep_tree(temp_dir, needles) == []  # Ray's session logs, job info, runtime_env agent logs
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_make_demo_runs_the_embedded_default_and_the_loss_falls(tmp_path: Path) -> None:
    """`make demo` = `python -m soho.train` with no arguments; only where it writes is redirected. It learns:
    the final model's held-out evaluation (100 scenes whose layouts never occur in training) is in the printed
    summary and in summary.json, on the generator's captions and on paraphrases in frames no training caption
    uses. Margins below the measured run in docs/RESULTS.md (seed 0: ITM 0.945, R@1 48 / 53 %; paraphrases
    0.940, 42 / 45 %; usage 1.00)."""
    env = {**os.environ, "SOHO_STORAGE_PATH": str(tmp_path / "runs"), "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(["make", "-C", str(REPO), "demo"], env=env, capture_output=True, text=True,
                          timeout=900)
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
    assert (sorted(p.name for p in run_dir.glob("checkpoint_step_*"))[-1]
            == f"checkpoint_step_{summary['steps']:08d}")
    held = summary["heldout"]
    assert on_disk["heldout"] == held
    assert held["num_candidates"] == 100 and held["chance_r1"] == 1.0
    assert held["itm_acc"] >= 0.88, held  # chance 0.5
    assert held["itm_acc_pos"] >= 0.7 and held["itm_acc_neg"] >= 0.7, held  # not a one-sided predictor
    assert held["t2i_r1"] >= 25.0 and held["i2t_r1"] >= 25.0, held  # percent among 100; chance 1 %
    assert held["para_itm_acc"] >= 0.85 and held["para_t2i_r1"] >= 20.0 and held["para_i2t_r1"] >= 20.0, held
    assert held["t2i_r1"] <= held["t2i_r5"] <= held["t2i_r10"] <= 100.0
    assert held["vd_usage_ratio"] >= 0.9 and held["vd_num_codes"] == 128, held
    assert 1.0 <= held["vd_perplexity"] <= 128.0
    printed = [line for line in proc.stdout.splitlines() if line.startswith("held-out (100 scenes")]
    assert len(printed) == 1 and f"ITM accuracy {held['itm_acc']:.3f}" in printed[0], proc.stdout[-2000:]
    # the curves behind the loss-curve panels: training ITM accuracy and codebook usage rose during the run
    history = read_history(str(tmp_path / "runs"), "soho-tiny")
    assert [r["step"] for r in history] == list(range(1, summary["steps"] + 1))
    tenth = len(history) // 10
    first, last = history[:tenth], history[-tenth:]
    assert sum(r["itm_acc"] for r in last) / tenth >= sum(r["itm_acc"] for r in first) / tenth + 0.2
    assert sum(r["vd_usage"] for r in last) / tenth >= 0.9 > sum(r["vd_usage"] for r in first[:5]) / 5
