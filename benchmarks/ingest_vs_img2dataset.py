"""Ingest throughput: ``python -m data_pipeline shard`` vs img2dataset 1.47 on the same 2,000 URLs.

    .venv/bin/python benchmarks/ingest_vs_img2dataset.py [--num 2000] [--processes 2] [--size 256]
    .venv/bin/python benchmarks/ingest_vs_img2dataset.py --scale 10000 100000   # writer growth only

The JPEGs (photo-like: noisy synthetic scenes, 640×480) are served by ``python -m http.server`` on
127.0.0.1 in its own process. Both tools get the same process count, threads per process, resize rule
(longest side ≤ --size, never upscaled, re-encoded JPEG) and WebDataset output; each runs once, and we
print samples/s of each and the ratio (target ≥ 1.5×). img2dataset 1.47 conflicts with the project's
pins, so it lives in its own venv ``.venv-bench`` (created here on first use, gitignored) and runs as a
subprocess with network-phoning features switched off.

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


def compare(a: argparse.Namespace) -> dict[str, float]:
    exe = ensure_bench_venv()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="ingest-bench-"))
    make_images(work / "images", a.num, (640, 480))
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                               "--directory", str(work / "images")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        urls = work / "urls.csv"
        with open(urls, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["url", "caption"])
            for i in range(a.num):
                w.writerow([f"http://127.0.0.1:{port}/{i:05d}.jpg", f"synthetic scene number {i}"])
        env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
        for d in ("out_i2d", "out_ours"):
            subprocess.run(["rm", "-rf", str(work / d)], check=True)
        t_i2d, r = run_timed([str(exe), "--url_list", str(urls), "--input_format", "csv", "--url_col", "url",
                              "--caption_col", "caption", "--output_format", "webdataset",
                              "--output_folder", str(work / "out_i2d"), "--processes_count", str(a.processes),
                              "--thread_count", str(a.threads), "--image_size", str(a.size),
                              "--resize_mode", "keep_ratio_largest", "--resize_only_if_bigger", "True",
                              "--encode_format", "jpg", "--encode_quality", "90",
                              "--number_sample_per_shard", str(a.samples_per_shard), "--timeout", "10",
                              "--retries", "0", "--enable_wandb", "False", "--distributor", "multiprocessing"],
                             env=env)
        if r.returncode != 0:
            raise RuntimeError(f"img2dataset failed:\n{r.stderr[-3000:]}")
        n_i2d = count_wds(work / "out_i2d")
        t_ours, r = run_timed([sys.executable, "-m", "data_pipeline", "shard", "--source", str(urls),
                               "--image-column", "url", "--caption-column", "caption",
                               "--output", str(work / "out_ours"), "--samples-per-shard", str(a.samples_per_shard),
                               "--workers", str(a.processes), "--fetch-threads", str(a.threads),
                               "--max-image-side", str(a.size), "--jpeg-quality", "90", "--no-progress"], env=env)
        if r.returncode != 0:
            raise RuntimeError(f"data_pipeline shard failed:\n{r.stderr[-3000:]}")
        n_ours = json.loads((work / "out_ours" / "manifest.json").read_text())["totals"]["samples"]
    finally:
        server.terminate()
        server.wait()
    s_i2d, s_ours = n_i2d / t_i2d, n_ours / t_ours
    print(f"{a.num} JPEGs 640x480 over http://127.0.0.1, {a.processes} processes × {a.threads} threads, "
          f"longest side ≤ {a.size}, webdataset output")
    print(f"img2dataset 1.47   : {n_i2d:5d} samples in {t_i2d:6.1f}s = {s_i2d:7.1f} samples/s")
    print(f"data_pipeline shard: {n_ours:5d} samples in {t_ours:6.1f}s = {s_ours:7.1f} samples/s")
    print(f"ratio (ours / img2dataset): {s_ours / s_i2d:.2f}×  (target ≥ 1.5×)")
    return {"img2dataset": s_i2d, "ours": s_ours, "ratio": s_ours / s_i2d}


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
        r = subprocess.run([sys.executable, "-c", _MEASURE, str(src), str(work / f"out-{n}")], capture_output=True,
                           text=True, cwd=REPO, check=True)
        m = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"{n:7d}  {m['seconds']:8.1f}  {m['samples'] / m['seconds']:10.1f}  {m['main_rss_mib']:20.1f}"
              f"  {m['worker_rss_mib']:22.1f}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num", type=int, default=2000)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--workdir", default=None, help="keep images/outputs here (default: a temp dir)")
    p.add_argument("--scale", type=int, nargs="*", default=None, help="pair counts for the growth benchmark")
    a = p.parse_args(argv)
    if a.scale:
        scale(a)
    else:
        compare(a)


if __name__ == "__main__":
    main()
