"""Kill a shard job mid-run and rerun it: the result is byte-identical to an uninterrupted run."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import http_server, jpeg_bytes, write_csv

REPO = Path(__file__).resolve().parents[2]


def _cmd(src: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "data_pipeline", "shard", "--source", str(src), "--output", str(out),
            "--samples-per-shard", "4", "--workers", "1", "--fetch-threads", "1", "--max-image-side", "32",
            "--no-progress"]


def _snapshot(out: Path) -> dict[str, str]:
    """Every visible file except the internal work records, by content hash."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir()) if p.is_file()}


@pytest.mark.slow
@pytest.mark.integration
def test_killed_job_resumes_to_identical_output(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    for i in range(40):
        (tmp_path / "img" / f"x{i}.jpg").write_bytes(jpeg_bytes(i, (40, 24 + i % 5)))
    with http_server(tmp_path / "img") as url:
        rows = [(f"{url}/delay/x{i}.jpg", f"caption {i}") for i in range(40)]
        rows += rows[2:6]  # duplicates of early rows, late in the source: dedupe must survive the restart
        rows += [(f"{url}/delay/missing{i}.jpg", f"gone {i}") for i in range(4)]
        write_csv(tmp_path / "t.csv", rows)
        ref = subprocess.run(_cmd(tmp_path / "t.csv", tmp_path / "ref"), cwd=REPO, capture_output=True,
                             text=True, timeout=300)
        assert ref.returncode == 0, ref.stderr

        out = tmp_path / "out"
        proc = subprocess.Popen(_cmd(tmp_path / "t.csv", out), cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 120
        while time.time() < deadline and len(list((out / "_work").glob("shards-*.json"))) < 3:
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)  # the job and its worker processes, no cleanup
        proc.wait()
        committed = len(list((out / "_work").glob("shards-*.json")))
        assert 3 <= committed < 12, "the kill must land mid-run"
        assert not (out / "manifest.json").exists()

        rerun = subprocess.run(_cmd(tmp_path / "t.csv", out), cwd=REPO, capture_output=True, text=True,
                               timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    skipped = int(re.search(r"\((\d+) already complete\)", rerun.stdout).group(1))
    assert skipped >= committed >= 3  # committed shards were not redone
    assert _snapshot(out) == _snapshot(tmp_path / "ref")
    assert not list(out.glob("*.tmp-*"))
    bad = (out / "bad_samples.jsonl").read_text()
    assert bad.count("duplicate_sample") == 4 and bad.count("url_http_404") == 4
