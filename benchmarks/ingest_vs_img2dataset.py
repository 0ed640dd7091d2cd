"""Ingest throughput: ``python -m data_pipeline shard`` vs img2dataset 1.47 on the same URLs; where our time
goes.

One command runs everything (creates the img2dataset venv on first use, then both variants, then the profile):

    .venv/bin/python benchmarks/ingest_vs_img2dataset.py                 # --num 2000 --processes 2 --size 256
    .venv/bin/python benchmarks/ingest_vs_img2dataset.py --only clean    # or: bad, profile
    .venv/bin/python benchmarks/ingest_vs_img2dataset.py --scale 10000 100000   # writer growth only

Variants, each run on both tools with the same process count, threads per process, resize rule (longest
side ≤ --size, never upscaled, JPEG quality 90), retries (0), timeout and WebDataset output:

* ``clean``: --num photo-like JPEGs (noisy synthetic scenes, 640×480, ~130 KB).
* ``bad``: the same, with every 10th URL bad, in the mix of the loopback test: early close (IncompleteRead),
  a non-HTTP banner (BadStatusLine), a slow drip (one byte per 0.4 s, ended by the server after 30 s),
  an oversized body (40 MB, no Content-Length) and a 404.

The URLs are served on 127.0.0.1 by a threaded HTTP/1.1 keep-alive server of this file in its own process
(``--serve``; listen backlog 128, so no SYN is dropped as with ``python -m http.server``'s 5). We print
samples/s of each tool, the ratio (target ≥ 1.5×) and the 1-minute load average at each figure: the
machine's load decides these numbers, compare only figures taken on a quiet machine. CPU-ms per sample
(user + sys of the tool's whole process tree, the server excluded) is printed too: it depends much less on
what else the machine runs.

``profile``: one process, every stage in one thread under cProfile (fetch, decode, resize, encode, tar,
hash, other), milliseconds per sample and share of the total.

img2dataset 1.47 conflicts with the project's pins, so it lives in its own venv ``.venv-bench`` (created here
on first use, gitignored) and runs as a subprocess with network-phoning features switched off.

Measured 2026-11-29 at e64c26f on the quiet 2-core dev box, two runs (1-min load average 1.0-2.7, most of it
the benchmark itself): clean 231.9 / 282.3 vs 90.7 / 105.7 samples/s = 2.56× / 2.67×; 10 % bad 94.9 / 95.4
vs 25.2 / 25.6 samples/s = 3.77× / 3.73×; profile 8.81 ms/sample = fetch 2.64, decode 2.83, resize 1.16,
encode 0.57, tar 0.42, hash 0.29, other 0.86.
Earlier the same day, on the shared box (other jobs running; the 1-min load average is given):
clean 261.7 vs 77.2 samples/s = 3.39× (load 4.2-4.9), 6.5 vs 16.9 CPU-ms/sample; 10 % bad 97.3 vs
25.4 samples/s = 3.83× (load 2.0-4.9), 9.1 vs 20.6 CPU-ms/sample. Profile (one thread, cProfile, load
2.5): 8.75 ms/sample = fetch 2.07, decode 3.00, resize 1.45, encode 0.53, tar 0.44, hash 0.27, other 0.94.
Most of the clean-variant gain over the 0.84× measured at a2a8dc6 is this server: ``python -m http.server``
(listen backlog 5, HTTP/1.0) dropped SYNs under 32 concurrent connects (1 s retransmits); a2a8dc6's own
code does 250-270 samples/s on this server, but dies on the first bad URL of the 10 % variant.

``--scale N1 N2 ...`` measures how our shard job's time and peak memory grow with the number of pairs
(a CSV of N rows over local files, unique captions): the writer streams, so memory should stay flat.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's data_pipeline, whatever the venv has installed
BENCH_VENV = REPO / ".venv-bench"


def ensure_bench_venv() -> Path:
    exe = BENCH_VENV / "bin" / "img2dataset"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
        subprocess.run([str(BENCH_VENV / "bin" / "pip"), "install", "-q", "img2dataset==1.47.0"], check=True)
    return exe


def make_images(folder: Path, num: int, size: tuple[int, int]) -> None:
    from data_pipeline.images import encode_jpeg
    from data_pipeline.synth import _SceneStream, render_scene

    folder.mkdir(parents=True, exist_ok=True)
    stream = _SceneStream(0, "bench", 1.0, max(size))
    for i in range(num):
        p = folder / f"{i:05d}.jpg"
        if p.exists():
            continue
        scene, _ = stream.scene(i)
        img = render_scene(scene, max(size), noise_seed=i).crop((0, 0, size[0], size[1]))
        p.write_bytes(encode_jpeg(img, 90))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def count_wds(folder: Path) -> int:
    n = 0
    for t in folder.glob("*.tar"):
        with tarfile.open(t) as tar:
            n += sum(1 for m in tar.getmembers() if m.name.endswith(".jpg"))
    return n


def run_timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, subprocess.CompletedProcess]:
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    return time.perf_counter() - t, r


def children_cpu() -> float:
    """CPU seconds (user + sys) of every reaped child process tree so far (the server is reaped last)."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def load() -> str:
    return f"load avg {os.getloadavg()[0]:.2f}"


# ------------------------------------------------------------------------------------------ the server

BAD_KINDS = ("early-close", "banner", "drip", "huge", "404")


def serve(folder: str, port: int) -> None:
    """Images of ``folder`` at /NAME, and the bad answers of BAD_KINDS at /KIND/NAME (see the docstring)."""
    import http.server

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def handle(self) -> None:
            try:
                super().handle()
            except OSError:
                pass

        def _head(self, length: int | None) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            if length is None:
                self.send_header("Connection", "close")
            else:
                self.send_header("Content-Length", str(length))
            self.end_headers()

        def do_GET(self) -> None:  # noqa: N802 - http.server API
            parts = self.path.strip("/").split("/")
            kind = parts[0] if len(parts) == 2 else "img"
            if kind == "img" and parts[-1].endswith(".jpg") and "/" not in parts[-1]:
                try:
                    body = (Path(folder) / parts[-1]).read_bytes()
                except OSError:
                    kind = "404"
                else:
                    self._head(len(body))
                    self.wfile.write(body)
                    return
            self.close_connection = True
            if kind == "early-close":
                self._head(50_000)
                self.wfile.write(b"\xff\xd8\xff\xe0" + b"\0" * 1000)
            elif kind == "banner":
                self.wfile.write(b"SSH-2.0-OpenSSH_9.6p1\r\n")
            elif kind == "drip":
                self._head(100_000)
                t0 = time.monotonic()
                while time.monotonic() - t0 < 30:
                    self.wfile.write(b"\xff")
                    self.wfile.flush()
                    time.sleep(0.4)
            elif kind == "huge":
                self._head(None)
                block = b"\xab" * (1 << 20)
                for _ in range(40):
                    self.wfile.write(block)
            else:
                self.send_error(404)

    class Server(http.server.ThreadingHTTPServer):
        request_queue_size = 128
        daemon_threads = True

    Server(("127.0.0.1", port), Handler).serve_forever()


def start_server(folder: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(folder), str(port)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.1)
    proc.terminate()
    raise RuntimeError("benchmark server did not start")


# ------------------------------------------------------------------------------------------ comparison


def write_urls(path: Path, num: int, port: int, bad_every: int) -> int:
    """URL list; with bad_every=10, rows 9, 19, ... are bad, cycling through BAD_KINDS. Returns #good."""
    good = 0
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["url", "caption"])
        for i in range(num):
            if bad_every and i % bad_every == bad_every - 1:
                kind = BAD_KINDS[(i // bad_every) % len(BAD_KINDS)]
                w.writerow([f"http://127.0.0.1:{port}/{kind}/{i:05d}.jpg", f"bad url number {i}"])
            else:
                w.writerow([f"http://127.0.0.1:{port}/{i:05d}.jpg", f"synthetic scene number {i}"])
                good += 1
    return good


def compare(a: argparse.Namespace, work: Path, port: int, variant: str) -> dict[str, float]:
    exe = ensure_bench_venv()
    urls = work / f"urls-{variant}.csv"
    good = write_urls(urls, a.num, port, 10 if variant == "bad" else 0)
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    out_i2d, out_ours = work / f"out_i2d-{variant}", work / f"out_ours-{variant}"
    for d in (out_i2d, out_ours):
        subprocess.run(["rm", "-rf", str(d)], check=True)
    load_i2d = load()
    cpu0 = children_cpu()
    t_i2d, r = run_timed([str(exe), "--url_list", str(urls), "--input_format", "csv", "--url_col", "url",
                          "--caption_col", "caption", "--output_format", "webdataset",
                          "--output_folder", str(out_i2d), "--processes_count", str(a.processes),
                          "--thread_count", str(a.threads), "--image_size", str(a.size),
                          "--resize_mode", "keep_ratio_largest", "--resize_only_if_bigger", "True",
                          "--encode_format", "jpg", "--encode_quality", "90",
                          "--number_sample_per_shard", str(a.samples_per_shard),
                          "--timeout", str(a.url_timeout),
                          "--retries", "0", "--enable_wandb", "False", "--distributor", "multiprocessing"],
                         env=env)
    if r.returncode != 0:
        raise RuntimeError(f"img2dataset failed:\n{r.stderr[-3000:]}")
    cpu_i2d = children_cpu() - cpu0
    n_i2d = count_wds(out_i2d)
    load_ours = load()
    cpu0 = children_cpu()
    t_ours, r = run_timed([sys.executable, "-m", "data_pipeline", "shard", "--source", str(urls),
                           "--image-column", "url", "--caption-column", "caption",
                           "--output", str(out_ours), "--samples-per-shard", str(a.samples_per_shard),
                           "--workers", str(a.processes), "--fetch-threads", str(a.threads),
                           "--url-timeout", str(a.url_timeout), "--url-retries", "0",
                           "--max-image-side", str(a.size), "--jpeg-quality", "90", "--no-progress"], env=env)
    if r.returncode != 0:
        raise RuntimeError(f"data_pipeline shard failed:\n{r.stderr[-3000:]}")
    cpu_ours = children_cpu() - cpu0
    m = json.loads((out_ours / "manifest.json").read_text())
    n_ours = m["totals"]["samples"]
    s_i2d, s_ours = n_i2d / t_i2d, n_ours / t_ours
    print(f"[{variant}] {a.num} URLs ({good} good), 640x480 JPEGs over http://127.0.0.1, "
          f"{a.processes} processes × {a.threads} threads, longest side ≤ {a.size}, "
          f"timeout {a.url_timeout:g}s, webdataset output")
    print(f"  img2dataset 1.47   : {n_i2d:5d} samples in {t_i2d:6.1f}s = {s_i2d:7.1f} samples/s, "
          f"{1000 * cpu_i2d / max(n_i2d, 1):5.1f} CPU-ms/sample  ({load_i2d} at start)")
    print(f"  data_pipeline shard: {n_ours:5d} samples in {t_ours:6.1f}s = {s_ours:7.1f} samples/s, "
          f"{1000 * cpu_ours / max(n_ours, 1):5.1f} CPU-ms/sample  ({load_ours} at start)")
    if variant == "bad":
        print(f"  ours rejected: {m['totals']['rejected_by_reason']}")
    cpu_ratio = (cpu_i2d / max(n_i2d, 1)) / max(cpu_ours / max(n_ours, 1), 1e-9)
    print(f"  ratio (ours / img2dataset): {s_ours / s_i2d:.2f}× samples/s (target ≥ 1.5×), "
          f"{cpu_ratio:.2f}× less CPU per sample  ({load()} at the end)", flush=True)
    return {"img2dataset": s_i2d, "ours": s_ours, "ratio": s_ours / s_i2d, "cpu_ratio": cpu_ratio}


# ------------------------------------------------------------------------------------------ profile

_STAGES = (  # (stage, how a profiled function is recognised: substring of "file:function")
    ("fetch", ("data_pipeline/fetch.py:fetch",)),
    ("decode", ("PIL/ImageFile.py:load", "PIL/Image.py:open", "PIL/Image.py:draft")),
    ("resize", ("PIL/Image.py:resize",)),
    ("encode", ("PIL/Image.py:save",)),
    ("to_rgb", ("data_pipeline/images.py:_to_rgb",)),
    ("tar", ("data_pipeline/writer.py:build_shard_bytes",)),
    ("hash", ("sha256", "blake2b")),
    ("write", ("data_pipeline/storage.py:atomic_write_bytes",)),
)


def profile(a: argparse.Namespace, work: Path, port: int) -> dict[str, float]:
    """Our per-sample work in one process and one thread, under cProfile; prints the stage breakdown."""
    import concurrent.futures as cf
    import cProfile
    import pstats

    from data_pipeline import shard
    from data_pipeline.sources import SourceRow
    from data_pipeline.storage import get_fs
    from data_pipeline.writer import ShardSample, write_shard

    n = min(a.num, a.profile_num)
    cfg = shard.ShardJobConfig(source="", output="", max_image_side=a.size, jpeg_quality=90, url_retries=0,
                               url_timeout=a.url_timeout)
    shard._init_worker(cfg)

    class Inline:  # the fetch threads' work in this thread, so that one profile sees every stage
        def submit(self, fn, *args):  # noqa: ANN001, ANN202
            fut: cf.Future = cf.Future()
            fut.set_result(fn(*args))
            return fut

    shard._FETCH_POOL = Inline()  # type: ignore[assignment]
    rows = [SourceRow(f"r{i}", f"http://127.0.0.1:{port}/{i:05d}.jpg", f"synthetic scene number {i}")
            for i in range(n)]
    fs, root = get_fs(str(work / "out_profile"))
    fs.makedirs(root, exist_ok=True)
    load_start = load()
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    results = []
    for s in range(0, n, cfg.chunk_size):
        results += shard.process_chunk(s, rows[s : s + cfg.chunk_size])
    samples = [ShardSample(f"{r.row:012d}", r.jpeg, r.caption,
                           {"source": r.source_id, "width": r.width, "height": r.height})
               for r in results if not r.bad]
    write_shard(fs, root, "p", 0, samples)
    prof.disable()
    total = time.perf_counter() - t
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    by_stage: dict[str, float] = {}
    for stage, marks in _STAGES:
        hits = [(k, v) for k, v in stats.items() if any(m in f"{k[0]}:{k[2]}" for m in marks)]
        # cumulative time of the outermost matches (tottime for C functions such as the hashes)
        by_stage[stage] = sum(v[3] for k, v in hits) if stage != "hash" else sum(v[2] for k, v in hits)
    # build_shard_bytes' own sha256 calls are counted under hash: take them out of tar.
    inner_hash = sum(v[2] for k, v in stats.items() if "sha256" in k[2] and any(
        "writer.py" in c[0] and c[2] == "build_shard_bytes" for c in v[4]))
    by_stage["tar"] -= inner_hash
    by_stage["other"] = total - sum(by_stage.values())
    print(f"[profile] {len(samples)} samples in one thread, {total:.2f}s = "
          f"{1000 * total / len(samples):.2f} ms/sample under cProfile ({load_start} at start, "
          f"{load()} at the end)")
    for stage, sec in by_stage.items():
        print(f"  {stage:7s} {1000 * sec / len(samples):7.2f} ms/sample  {100 * sec / total:5.1f} %")
    return by_stage


_MEASURE = r"""
import json, resource, sys, time
from data_pipeline.shard import ShardJobConfig, run_shard_job
t = time.perf_counter()
s = run_shard_job(ShardJobConfig(source=sys.argv[1], output=sys.argv[2], samples_per_shard=1000, workers=2,
                                 max_image_side=64, progress=False))
print(json.dumps({"seconds": time.perf_counter() - t, "samples": s.samples,
                  "main_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "worker_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def scale(a: argparse.Namespace) -> None:
    work = Path(a.workdir or tempfile.mkdtemp(prefix="scale-bench-"))
    make_images(work / "images", 1000, (128, 96))
    print("pairs     seconds   samples/s   peak RSS main (MiB)   peak RSS worker (MiB)")
    for n in a.scale:
        src = work / f"rows-{n}.csv"
        with open(src, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image", "caption"])
            for i in range(n):  # unique captions: no row is a duplicate, every row is written
                w.writerow([f"images/{i % 1000:05d}.jpg", f"pair {i}"])
        subprocess.run(["rm", "-rf", str(work / f"out-{n}")], check=True)
        r = subprocess.run([sys.executable, "-c", _MEASURE, str(src), str(work / f"out-{n}")],
                           capture_output=True, text=True, cwd=REPO, check=True)
        m = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"{n:7d}  {m['seconds']:8.1f}  {m['samples'] / m['seconds']:10.1f}  {m['main_rss_mib']:20.1f}"
              f"  {m['worker_rss_mib']:22.1f}")


def main(argv: list[str] | None = None) -> None:
    if argv is None and len(sys.argv) == 4 and sys.argv[1] == "--serve":
        serve(sys.argv[2], int(sys.argv[3]))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num", type=int, default=2000)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--url-timeout", type=float, default=5.0, help="both tools (ours: total per URL)")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--profile-num", type=int, default=500, help="samples in the profile")
    p.add_argument("--only", choices=("clean", "bad", "profile"), action="append", default=None)
    p.add_argument("--workdir", default=None, help="keep images/outputs here (default: a temp dir)")
    p.add_argument("--scale", type=int, nargs="*", default=None, help="pair counts for the growth benchmark")
    a = p.parse_args(argv)
    if a.scale:
        scale(a)
        return
    work = Path(a.workdir or tempfile.mkdtemp(prefix="ingest-bench-"))
    make_images(work / "images", a.num, (640, 480))
    server, port = start_server(work / "images")
    try:
        for what in a.only or ("clean", "bad", "profile"):
            if what == "profile":
                profile(a, work, port)
            else:
                compare(a, work, port, what)
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
