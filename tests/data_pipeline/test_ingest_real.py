"""The real data path: a crawl behind a header-less TSV, parquet parts and a JSONL against a misbehaving
server on 127.0.0.1 (early close, non-HTTP banner, slow drip, oversized body, 404, noai) — the job exits 0,
keeps every good row, reports every bad one with its reason, cuts the drip at the deadline, stays within a
memory bound, writes shards the ``webdataset`` library reads, and a relaunch leaves the same manifest."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import jpeg_bytes, read_shards
from PIL import Image
from web_server import web_server

from data_pipeline.shard import ShardJobConfig, run_shard_job

REPO = Path(__file__).resolve().parents[2]
IMG = {f"g{i}.jpg": jpeg_bytes(i, (48 + i, 32)) for i in range(12)}
HUGE = 600 * 1024 * 1024  # a buffering client would hold all of it
RSS_BOUND_MIB = 160  # measured ~98 MiB; a client buffering the body (until the deadline) reaches 300+

# Run the CLI in one process whose peak RSS (its own and its worker's) is reported at exit. Its own is
# VmHWM, not RUSAGE_SELF: ru_maxrss survives exec, so it would report the RSS of the pytest that forked us.
_MEASURED = r"""
import json, re, resource, sys
from data_pipeline.cli import main
rc = main(sys.argv[2:])
own = int(re.search(r"VmHWM:\s+(\d+) kB", open("/proc/self/status").read()).group(1))
peak = max(own, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
open(sys.argv[1], "w").write(json.dumps({"rc": rc, "peak_rss_mib": peak / 1024}))
sys.exit(rc)
"""


def _wait_for(srv, kind: str) -> list[dict]:
    """The server logs a drip/huge request when its writes start failing, shortly after the client left."""
    deadline = time.monotonic() + 10
    while not srv.requests(kind) and time.monotonic() < deadline:
        time.sleep(0.02)
    return srv.requests(kind)


def _bad(out: Path) -> dict[str, str]:
    lines = (out / "bad_samples.jsonl").read_text().splitlines()
    return {b["source_id"]: b["reason"] for b in map(json.loads, lines)}


def _wds_samples(out: Path) -> dict[str, tuple[str, dict]]:
    """caption → (source id, meta) of every sample, read back with the webdataset library itself."""
    import webdataset as wds

    manifest = json.loads((out / "manifest.json").read_text())
    urls = [str(out / s["name"]) for s in manifest["shards"]]
    got = {}
    for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        meta = json.loads(s["json"])
        img = Image.open(io.BytesIO(s["jpg"]))
        assert img.mode == "RGB" and img.size == (meta["width"], meta["height"])
        got[s["txt"].decode()] = (meta["source"], meta)
    assert len(got) == manifest["totals"]["samples"]
    return got


@pytest.mark.slow
@pytest.mark.integration
def test_crawl_of_real_formats_survives_every_bad_input(tmp_path: Path) -> None:
    with web_server(IMG, drip_interval=0.4, huge_bytes=HUGE) as srv:
        u = srv.url
        # --- CC3M style: header-less TSV, caption then URL.
        tsv_rows = [(f"tsv good {i}", f"{u}/img/g{i}.jpg") for i in range(4)] + [
            ("early close", f"{u}/early-close/a.jpg"), ("banner", f"{u}/banner/a.jpg"),
            ("drip", f"{u}/drip/a.jpg"), ("huge", f"{u}/huge/a.jpg"),
            ("huge declared", f"{u}/huge-declared/a.jpg"),
            ("not found", f"{u}/missing.jpg"), ("noai", f"{u}/noai/g0.jpg")]
        lines = [f"{c}\t{url}" for c, url in tsv_rows] + ["three\tfields\there"]
        (tmp_path / "cc3m.tsv").write_text("\n".join(lines) + "\n")
        stats = tmp_path / "rss.json"
        cmd = [sys.executable, "-c", _MEASURED, str(stats), "shard", "--source", str(tmp_path / "cc3m.tsv"),
               "--columns", "caption,url", "--image-column", "url", "--output", str(tmp_path / "out_tsv"),
               "--samples-per-shard", "4", "--workers", "1", "--fetch-threads", "4", "--max-image-side", "32",
               "--url-timeout", "2", "--url-retries", "1", "--max-image-bytes", "2000000", "--no-progress"]
        t = time.monotonic()
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
        elapsed = time.monotonic() - t
        assert r.returncode == 0, r.stderr
        assert elapsed < 25
        drip = _wait_for(srv, "drip")
        # Cut at the 2 s deadline (the server notices a write or two later; slack for a loaded machine):
        # without a total deadline each byte resets the read timeout and the server's 60 s cap would end it.
        assert len(drip) == 1 and drip[0]["seconds"] < 5.0, drip
        assert json.loads(stats.read_text())["peak_rss_mib"] < RSS_BOUND_MIB, stats.read_text()
        assert _wait_for(srv, "huge")[0]["sent"] < 64 << 20  # refused while streaming, not read to the end
        assert _bad(tmp_path / "out_tsv") == {
            "cc3m.tsv:row4": "url_incomplete_read", "cc3m.tsv:row5": "url_bad_response",
            "cc3m.tsv:row6": "url_timeout", "cc3m.tsv:row7": "url_too_large",
            "cc3m.tsv:row8": "url_too_large", "cc3m.tsv:row9": "url_http_404",
            "cc3m.tsv:row10": "url_robots_noai", "cc3m.tsv:row11": "unparseable_row"}
        got = _wds_samples(tmp_path / "out_tsv")
        assert {c: s for c, (s, _) in got.items()} == {f"tsv good {i}": f"cc3m.tsv:row{i}" for i in range(4)}
        assert max(max(m["width"], m["height"]) for _, m in got.values()) == 32

        # Relaunch: every shard is already committed, the manifest and the report are the same bytes.
        reports = ("manifest.json", "bad_samples.jsonl")
        before = [(tmp_path / "out_tsv" / n).read_bytes() for n in reports]
        r2 = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
        assert r2.returncode == 0, r2.stderr
        assert "(3 already complete)" in r2.stdout
        assert [(tmp_path / "out_tsv" / n).read_bytes() for n in reports] == before

        # --- LAION style: a folder of two parquet parts; part 0 has a null caption, part 1's captions are
        # ints.
        parts = tmp_path / "laion"
        parts.mkdir()
        pq.write_table(pa.table({"URL": [f"{u}/img/g{i}.jpg" for i in range(4, 8)] + [f"{u}/img/g8.jpg"],
                                 "TEXT": [f"parquet good {i}" for i in range(4, 8)] + [None]}),
                       parts / "part-00000.parquet")
        pq.write_table(pa.table({"URL": [f"{u}/img/g9.jpg"], "TEXT": pa.array([123], pa.int64())}),
                       parts / "part-00001.parquet")
        cfg = dict(source=str(parts), output=str(tmp_path / "out_pq"), image_column="URL",
                   caption_column="TEXT", samples_per_shard=3, workers=0, fetch_threads=4, max_image_side=32,
                   url_timeout=1.0, url_retries=0, progress=False)
        run_shard_job(ShardJobConfig(**cfg))
        assert _bad(tmp_path / "out_pq") == {"part-00000.parquet:row4": "missing_caption",
                                             "part-00001.parquet:row0": "caption_not_string"}
        got = _wds_samples(tmp_path / "out_pq")
        assert {c: s for c, (s, _) in got.items()} == {
            f"parquet good {i}": f"part-00000.parquet:row{i - 4}" for i in range(4, 8)}
        rows = json.loads((tmp_path / "out_pq" / "manifest.json").read_text())["writer"]["rows"]
        assert rows == 6  # global row numbers run on across parts in sorted order
        # A relaunch (in this process, nothing left to do) leaves the same manifest.
        m1 = (tmp_path / "out_pq" / "manifest.json").read_bytes()
        assert run_shard_job(ShardJobConfig(**cfg)).skipped_shards == 2
        assert (tmp_path / "out_pq" / "manifest.json").read_bytes() == m1

        # --- JSONL: numbers and nulls where captions belong, a broken line, an image path no OS accepts.
        jl = [{"image": f"{u}/img/g10.jpg", "caption": "jsonl good 10"},
              {"image": f"{u}/img/g11.jpg", "caption": 7}, {"image": f"{u}/img/g11.jpg", "caption": None},
              {"image": f"{u}/img/g11.jpg", "caption": ["a"]},
              {"image": "img/nul\u0000byte.jpg", "caption": "a path with a NUL byte"},
              {"image": 5, "caption": "an int where the image belongs"},
              {"image": f"{u}/img/g11.jpg", "caption": "jsonl good 11"}]
        (tmp_path / "t.jsonl").write_text("\n".join([json.dumps(x) for x in jl[:3]] + ["{not json"]
                                                    + [json.dumps(x) for x in jl[3:]]) + "\n")
        run_shard_job(ShardJobConfig(**{**cfg, "source": str(tmp_path / "t.jsonl"),
                                        "output": str(tmp_path / "out_jl"), "image_column": "image",
                                        "caption_column": "caption"}))
    bad = _bad(tmp_path / "out_jl")
    assert bad == {"t.jsonl:row1": "caption_not_string", "t.jsonl:row2": "missing_caption",
                   "t.jsonl:row3": "unparseable_row", "t.jsonl:row4": "caption_not_string",
                   "t.jsonl:row5": "unexpected_error", "t.jsonl:row6": "bad_image_reference"}
    detail = [json.loads(x) for x in (tmp_path / "out_jl" / "bad_samples.jsonl").read_text().splitlines()]
    assert next(b["detail"] for b in detail if b["reason"] == "unexpected_error").startswith("ValueError: ")
    assert set(_wds_samples(tmp_path / "out_jl")) == {"jsonl good 10", "jsonl good 11"}
    m = json.loads((tmp_path / "out_jl" / "manifest.json").read_text())
    assert m["totals"]["rejected_by_reason"] == {"bad_image_reference": 1, "caption_not_string": 2,
                                                 "missing_caption": 1, "unexpected_error": 1,
                                                 "unparseable_row": 1}


@pytest.mark.slow
@pytest.mark.integration
def test_a_worker_killed_on_one_input_costs_only_that_input(tmp_path: Path) -> None:
    """An OOM killer of our own SIGKILLs any worker whose memory grows by 60 MB: the one decoding a
    25-megapixel image, every time. Its chunk is redone in a fresh process, then row by row, and only that
    row is reported (worker_crashed); every other row is kept."""
    import psutil

    (tmp_path / "img").mkdir()
    for i in range(10):
        (tmp_path / "img" / f"g{i}.jpg").write_bytes(IMG[f"g{i}.jpg"])
    Image.new("RGB", (5000, 5000), (9, 9, 9)).save(tmp_path / "img" / "big.png")  # ~80 KB, 75 MB decoded
    rows = [{"image": f"img/g{i}.jpg", "caption": f"good {i}"} for i in range(10)]
    rows.insert(5, {"image": "img/big.png", "caption": "needs too much memory"})
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    kills: list[int] = []
    stop = threading.Event()

    def oom_killer() -> None:
        first: dict[int, int] = {}
        while not stop.is_set():
            for p in psutil.Process().children(recursive=True):
                try:
                    rss = p.memory_info().rss
                    if rss - first.setdefault(p.pid, rss) > 60 << 20:
                        p.kill()
                        kills.append(p.pid)
                except psutil.Error:
                    pass
            time.sleep(0.005)

    watcher = threading.Thread(target=oom_killer, daemon=True)
    watcher.start()
    try:
        summary = run_shard_job(ShardJobConfig(source=str(tmp_path / "t.jsonl"), output=str(tmp_path / "out"),
                                               samples_per_shard=4, chunk_size=3, workers=1, fetch_threads=2,
                                               max_image_side=32, progress=False))
    finally:
        stop.set()
        watcher.join()
    assert len(kills) >= 2  # the first run and the redo of that row alone
    assert summary.rejected == {"worker_crashed": 1}
    assert _bad(tmp_path / "out") == {"t.jsonl:row5": "worker_crashed"}
    captions = {v["txt"].decode() for v in read_shards(tmp_path / "out").values()}
    assert captions == {f"good {i}" for i in range(10)}
