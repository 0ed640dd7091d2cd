"""Training-step options side by side: --grad-checkpointing, --channels-last, --compile (issue 18).

Each variant runs in a fresh subprocess (peak RSS is a per-process high-water mark; torch allocations are
invisible to tracemalloc): the model is built, the options are applied by the real
``orchestration.runtime.engine.build_engine`` (plain-torch engine, one process, fp32 AdamW), then
``--warmup`` steps (for --compile: the steps that compile) and ``--steps`` timed optimizer steps on one fixed
batch. Reported per variant: samples/s of the timed steps, peak RSS (``resource.getrusage``) after the model
and optimizer were built, at the end, and their difference (≈ the step's activations + gradients + AdamW
state), the warm-up time, and the ratios to ``plain``.

Workload (default): the small preset (ResNet-18 trunk, random init; 6-layer c=384 BERT, random init, the
architecture of the packaged MiniLM), batch 2 of 600×1000 images (padded to 640×1024, the loader's multiple
of the total stride 64 → 10×16 = 160 visual tokens, each holding real pixels) + 32 text tokens. The parent
asserts the workload each child reports (shapes, token counts, finite losses, step counts).

    python benchmarks/step_options.py [--preset small] [--height 600 --width 1000] [--batch 2]
        [--steps 3] [--warmup 1] [--variants plain,ckpt,channels_last,ckpt+channels_last,compile]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "plain": {},
    "ckpt": {"grad_checkpointing": True},
    "channels_last": {"channels_last": True},
    "ckpt+channels_last": {"grad_checkpointing": True, "channels_last": True},
    "compile": {"compile": True},
    "compile+channels_last": {"compile": True, "channels_last": True},
    "compile+ckpt": {"compile": True, "grad_checkpointing": True},
}
DEFAULT_VARIANTS = "plain,ckpt,channels_last,ckpt+channels_last,compile"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def child(args: argparse.Namespace) -> dict:
    import torch

    from orchestration.runtime.config import OptimConfig, ScaleConfig
    from orchestration.runtime.engine import build_engine
    from soho import SohoForPretraining, get_preset

    cfg = get_preset(args.preset)
    cfg.encoder.weights = None  # random init: same FLOPs, no download
    cfg.transformer.name_or_path = None
    torch.manual_seed(0)
    model = SohoForPretraining(cfg)
    options = VARIANTS[args.variant]
    built = build_engine(model, OptimConfig(lr=1e-4), ScaleConfig(launcher="local", num_workers=1,
                                                                  micro_batch_size=args.batch, **options),
                         1, kind="torch")
    stride = cfg.encoder.total_stride
    hp, wp = (math.ceil(args.height / stride) * stride, math.ceil(args.width / stride) * stride)
    g = torch.Generator().manual_seed(0)
    pv = torch.zeros(args.batch, 3, hp, wp)
    pv[:, :, :args.height, :args.width] = torch.randn(args.batch, 3, args.height, args.width, generator=g)
    pm = torch.zeros(args.batch, hp, wp, dtype=torch.bool)
    pm[:, :args.height, :args.width] = True
    ids = torch.randint(1000, 30000, (args.batch, args.text), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    am = torch.ones_like(ids)
    engine = built.engine
    engine.eval()  # the workload check's look at the token grid: no VD update, no BN update
    with torch.no_grad():
        visual = engine.soho.encode_visual(pv, pm).visual
    engine.train()
    rss_built = peak_rss_mib()

    def step(i: int) -> float:
        out = engine(pv, pm, ids, am, generator=torch.Generator().manual_seed(i))
        built.backward_step(out.loss, grad_clip=1.0)
        return out.loss.item()

    t0 = time.perf_counter()
    losses = [step(i) for i in range(args.warmup)]
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    losses += [step(args.warmup + i) for i in range(args.steps)]
    timed_s = time.perf_counter() - t0
    rss_end = peak_rss_mib()
    return {
        "variant": args.variant, "options": options, "preset": args.preset, "batch": args.batch,
        "pixel_shape": list(pv.shape), "visual_tokens": int(visual.mask.shape[1]),
        "real_visual_tokens": int(visual.mask[0].sum()), "grid": list(visual.grid), "text_tokens": args.text,
        "steps": args.steps, "warmup": args.warmup, "losses": losses, "warmup_s": warmup_s,
        "timed_s": timed_s, "samples_per_s": args.batch * args.steps / timed_s,
        "peak_rss_built_mib": rss_built, "peak_rss_mib": rss_end, "step_rss_mib": rss_end - rss_built,
        "threads": torch.get_num_threads(),
    }


def run_variant(args: argparse.Namespace, variant: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--variant", variant, "--preset", args.preset,
           "--height", str(args.height), "--width", str(args.width), "--batch", str(args.batch),
           "--text", str(args.text), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "HF_HUB_OFFLINE": "1", "SOHO_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    if proc.returncode != 0:
        raise SystemExit(f"variant {variant} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])
    result["process_s"] = time.perf_counter() - t0
    return result


def check_workload(r: dict, args: argparse.Namespace, stride: int) -> None:
    """The figures are only comparable if every variant ran the same work."""
    h, w = math.ceil(args.height / stride), math.ceil(args.width / stride)
    assert r["pixel_shape"] == [args.batch, 3, h * stride, w * stride], r["pixel_shape"]
    assert r["grid"] == [h, w] and r["visual_tokens"] == h * w, (r["grid"], r["visual_tokens"])
    real = math.ceil(args.height / stride) * math.ceil(args.width / stride)
    assert r["real_visual_tokens"] == real, r["real_visual_tokens"]
    assert len(r["losses"]) == args.steps + args.warmup and all(math.isfinite(x) for x in r["losses"])
    assert r["steps"] == args.steps and r["timed_s"] > 0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--height", type=int, default=600)
    p.add_argument("--width", type=int, default=1000)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--text", type=int, default=32)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--variants", default=DEFAULT_VARIANTS)
    p.add_argument("--timeout", type=float, default=3600, help="seconds per variant")
    p.add_argument("--out", type=Path, help="also write the results as JSON here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)), flush=True)
        return
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; known: {list(VARIANTS)}")
    from soho import get_preset

    stride = get_preset(args.preset).encoder.total_stride
    load_before = os.getloadavg()
    results = []
    for v in variants:
        r = run_variant(args, v)
        check_workload(r, args, stride)
        results.append(r)
        print(f"{v:24s} {r['samples_per_s']:.3f} samples/s  peak RSS {r['peak_rss_mib']:.0f} MiB "
              f"(step +{r['step_rss_mib']:.0f})  warm-up {r['warmup_s']:.1f} s", flush=True)
    base = next((r for r in results if r["variant"] == "plain"), results[0])
    print(f"\n{args.preset} preset, batch {args.batch} × {args.height}×{args.width}, {args.steps} timed "
          f"steps after {args.warmup} warm-up; {base['threads']} torch threads; load average "
          f"{load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after")
    print(f"{'variant':24s} {'samples/s':>9s} {'x plain':>7s} {'peak RSS MiB':>12s} {'x plain':>7s} "
          f"{'step RSS MiB':>12s} {'x plain':>7s} {'warm-up s':>9s}")
    for r in results:
        speed = r["samples_per_s"] / base["samples_per_s"]
        print(f"{r['variant']:24s} {r['samples_per_s']:9.3f} {speed:7.2f} "
              f"{r['peak_rss_mib']:12.0f} {r['peak_rss_mib'] / base['peak_rss_mib']:7.2f} "
              f"{r['step_rss_mib']:12.0f} {r['step_rss_mib'] / max(base['step_rss_mib'], 1):7.2f} "
              f"{r['warmup_s']:9.1f}")
    if args.out:
        args.out.write_text(json.dumps({"load_average": [load_before, os.getloadavg()], "results": results},
                                       indent=2))


if __name__ == "__main__":
    main()
