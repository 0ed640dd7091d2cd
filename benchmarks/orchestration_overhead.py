"""What does the orchestration cost? The same model, batches and steps four ways, steady-state samples/s:

  bare     a plain single-process torch loop: loader → SohoForPretraining → AdamW (no DeepSpeed, no Ray)
  zero0    our worker loop in this process, DeepSpeed ZeRO-0 (global non-finite check, metrics, history)
  zero2    the same at ZeRO-2
  ray      the same worker loop through Ray Train with 1 worker, ZeRO-2 (skip with --no-ray)

A busy machine's noise is larger than the 5 % this benchmark has to see, so the variants are measured in
``--rounds`` rounds (default 3), each round running every variant once in a rotated order (round r starts
with variant r), and every figure is a median over rounds: per variant the median of its per-round
steady-state rates, the min–max spread of those, and the ratio to bare (median of the per-round ratios
variant / bare of the same round, so a slow round slows both sides of its ratio).

Each in-process variant (bare, zero0, zero2) runs in a fresh Python process of its own session: Linux's
scheduler autogroups share the CPUs per session first, and Ray starts its workers in a session of its own,
so a variant run inside this driver's session would get less CPU than the Ray worker on a busy machine
(measured here: the same fixed-batch step 0.40-0.51 s wall in a Ray task, 0.64-1.46 s in the driver, the
same CPU seconds). A fresh process per variant also keeps one variant's allocator and DeepSpeed state out
of the next.

Steady state = median per-step samples/s over the steps after the first ``--skip`` (allocator growth, the
first shard opens, the cold start's switch). Each variant times the whole step, batch fetch included
(the bare loop from before ``next(loader)``, the worker from before it asks the loader). Checkpointing is
left out of the measured window (only the final checkpoint, after the last measured step). Before any
figure is printed the workload is asserted equal: every variant ran the same number of steps and saw the
same number of samples, the bare loop saw only full batches of the configured shape, and the worker runs
trained the same model config on a loader configured by the same settings.

    python benchmarks/orchestration_overhead.py [--rounds 3] [--steps 40] [--skip 8] [--no-ray]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from orchestration.pretrain.config import RunConfig  # noqa: E402
from orchestration.pretrain.worker import step_generator  # noqa: E402
from orchestration.runtime.schedule import apply_lr, param_groups  # noqa: E402

VARIANTS = ("bare", "zero0", "zero2", "ray")


def bare_loop(cfg: RunConfig, data_url: str) -> tuple[list[float], dict[str, Any]]:
    """Per-step samples/s of a plain torch loop over the very same loader stream, and its workload."""
    from data_pipeline.loader import LoaderConfig, PretrainLoader
    from soho import SohoForPretraining

    model_cfg = cfg.model_config()  # the model the worker loop trains (preset + model_overrides)
    torch.manual_seed(cfg.seed)
    model = SohoForPretraining(model_cfg)
    groups, specs = param_groups(model, cfg.optim)
    opt = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=(cfg.optim.adam_beta1, cfg.optim.adam_beta2))
    loader = PretrainLoader(LoaderConfig(urls=data_url, batch_size=cfg.scale.micro_batch_size,
                                         max_image_side=cfg.dataset.image_size,
                                         pad_multiple=model_cfg.encoder.total_stride,
                                         max_text_len=cfg.dataset.max_text_len, resampled=True, seed=cfg.seed,
                                         num_workers=cfg.dataset.loader_workers))
    model.train()
    it = iter(loader)
    rates: list[float] = []
    samples = 0
    shapes: set[tuple[int, ...]] = set()
    for step in range(cfg.optim.max_steps):
        t0 = time.perf_counter()
        frozen = step < cfg.optim.freeze_backbone_steps  # the worker's cold start
        apply_lr(opt, specs, cfg.optim, step, frozen=frozen)
        batch = next(it)
        out = model(batch["pixel_values"], batch["pixel_mask"], batch["input_ids"], batch["attention_mask"],
                    generator=step_generator(cfg.seed, step, 0))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        n = int(batch["pixel_values"].shape[0])
        rates.append(n / (time.perf_counter() - t0))
        samples += n
        shapes.add((n, int(batch["input_ids"].shape[0]), *batch["pixel_values"].shape[1:2]))
    return rates, {"steps": len(rates), "samples_seen": samples, "shapes": sorted(shapes)}


def worker_loop(cfg: RunConfig, data_url: str) -> tuple[list[float], dict[str, Any]]:
    from orchestration.pretrain.launch import launch_local

    worker = launch_local(cfg, data_url)["worker"]
    hist = worker["history"]
    return [r["samples_per_s"] for r in hist], {"steps": worker["step"], "records": len(hist),
                                                "samples_seen": worker["samples_seen"],
                                                "nonfinite_steps": worker["nonfinite_steps"]}


def ray_loop(cfg: RunConfig, data_url: str) -> tuple[list[float], dict[str, Any]]:
    from orchestration.pretrain.launch import launch_ray
    from orchestration.runtime.checkpoint import read_history

    summary = launch_ray(cfg, data_url)
    # the per-step history lives in the run's history log beside the checkpoints
    hist = read_history(cfg.checkpoint.storage_path, cfg.name, storage_options=cfg.storage_options())
    return [r["samples_per_s"] for r in hist], {"steps": summary["steps"], "records": len(hist),
                                                "samples_seen": summary["samples_seen"],
                                                "nonfinite_steps": summary["nonfinite_steps"]}


def run_isolated(name: str, cfg: RunConfig, data_url: str,
                 threads: int) -> tuple[list[float], dict[str, Any]]:
    """Run one in-process variant in a fresh interpreter in a new session (see the module docstring)."""
    import subprocess

    with tempfile.TemporaryDirectory(prefix="soho-overhead-variant-") as tmp:
        out = Path(tmp) / "result.json"
        (Path(tmp) / "config.json").write_text(json.dumps(cfg.to_dict()))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--variant", name, "--variant-config",
               str(Path(tmp) / "config.json"), "--variant-data", data_url, "--variant-out", str(out),
               "--threads", str(threads)]
        proc = subprocess.run(cmd, start_new_session=True, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"variant {name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        result = json.loads(out.read_text())
    return result["rates"], result["work"]


def variant_main(args: argparse.Namespace) -> None:
    """Child side of :func:`run_isolated`: one variant, its rates and workload as JSON."""
    cfg = RunConfig.from_dict(json.loads(Path(args.variant_config).read_text()), source=args.variant_config)
    if args.variant != "bare":
        from orchestration.runtime.distributed import ensure_process_group

        ensure_process_group(use_gpu=False)
    rates, work = (bare_loop if args.variant == "bare" else worker_loop)(cfg, args.variant_data)
    work = {k: [list(x) for x in v] if k == "shapes" else v for k, v in work.items()}
    Path(args.variant_out).write_text(json.dumps({"rates": rates, "work": work}))


def steady(rates: list[float], skip: int) -> float:
    return statistics.median(rates[skip:])


def check_workload(name: str, work: dict[str, Any], cfg: RunConfig) -> None:
    """Every variant must have done the same work, or its samples/s compare nothing."""
    steps, batch = cfg.optim.max_steps, cfg.scale.micro_batch_size
    if work["steps"] != steps or work.get("records", steps) != steps:
        raise AssertionError(f"{name}: ran {work} steps/records, expected {steps}")
    if work["samples_seen"] != steps * batch:
        raise AssertionError(f"{name}: saw {work['samples_seen']} samples, expected {steps} × {batch}")
    if work.get("nonfinite_steps", 0):
        raise AssertionError(f"{name}: {work['nonfinite_steps']} non-finite steps were skipped and redone")
    if "shapes" in work and [tuple(x) for x in work["shapes"]] != [(batch, batch, 3)]:
        raise AssertionError(f"{name}: batch shapes {work['shapes']}, expected only ({batch}, {batch}, 3)")


def summarise(per_round: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Per variant: median and min–max of its per-round rates, and the median (min–max) of its per-round
    ratio to bare."""
    out: dict[str, dict[str, float]] = {}
    for name, rates in per_round.items():
        ratios = [r / b for r, b in zip(rates, per_round["bare"], strict=True)]
        out[name] = {"median": statistics.median(rates), "min": min(rates), "max": max(rates),
                     "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of every variant (at least 3)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--skip", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=96)
    ap.add_argument("--threads", type=int, default=1, help="torch threads in every variant (same budget)")
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument("--json", help="also write the figures to this file")
    for internal in ("--variant", "--variant-config", "--variant-data", "--variant-out"):
        ap.add_argument(internal, help=argparse.SUPPRESS)  # run_isolated's child process
    args = ap.parse_args()
    if args.variant:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        variant_main(args)
        return
    if args.rounds < 3:
        ap.error(f"--rounds {args.rounds}: at least 3 rounds are needed for a median and a spread")
    if not 0 <= args.skip < args.steps - 2:
        ap.error(f"--skip {args.skip} must leave at least 3 of the --steps {args.steps} measured")
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    work_dir = Path(tempfile.mkdtemp(prefix="soho-overhead-"))
    from data_pipeline.synth import make_synthetic

    synth = make_synthetic(str(work_dir / "synth"), num=512, seed=0, image_size=128)
    data_url = synth.get("pretrain_manifest") or str(work_dir / "synth" / "pretrain" / "manifest.json")
    base = RunConfig.of(launcher="local", num_workers=1, zero_stage=0, micro_batch_size=args.batch,
                        image_size=args.image_size, max_steps=args.steps, checkpoint_every=10**6,
                        metrics_port=-1, storage_path=str(work_dir / "runs"), log_every=10**6, data=data_url,
                        cpus_per_worker=args.threads)
    configs = {"bare": base, "zero0": base.replace(zero_stage=0), "zero2": base.replace(zero_stage=2),
               "ray": base.replace(launcher="ray", zero_stage=2)}
    variants = [v for v in VARIANTS if not (args.no_ray and v == "ray")]
    if "ray" in variants:  # one local Ray for all rounds (launch_ray joins it and leaves it running)
        import ray

        from orchestration.runtime.ray_launch import ray_runtime_env

        ray.init(num_cpus=max(args.threads, os.cpu_count() or 1), include_dashboard=False,
                 runtime_env=ray_runtime_env(False), log_to_driver=False)
    per_round: dict[str, list[float]] = {v: [] for v in variants}
    t_start = time.perf_counter()
    for rnd in range(args.rounds):
        order = variants[rnd % len(variants):] + variants[:rnd % len(variants)]
        for name in order:
            cfg = configs[name].replace(run_name=f"{name}-r{rnd}")
            if name == "ray":  # the driver only waits: the worker runs in Ray's own session
                rates, work = ray_loop(cfg, data_url)
            else:
                rates, work = run_isolated(name, cfg, data_url, args.threads)
            check_workload(f"round {rnd} {name}", work, cfg)
            per_round[name].append(steady(rates, args.skip))
            print(f"round {rnd} {name:>5}: {per_round[name][-1]:7.2f} samples/s "
                  f"({time.perf_counter() - t_start:.0f} s)", flush=True)
    table = summarise(per_round)
    print(f"\n{args.rounds} rounds × {args.steps} steps (first {args.skip} not measured), "
          f"batch {args.batch}, {args.image_size} px, {args.threads} thread(s); "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"{'variant':>8} {'median/s':>9} {'min–max/s':>15} {'ratio':>6} {'ratio min–max':>14}")
    for name, row in table.items():
        print(f"{name:>8} {row['median']:9.2f} {row['min']:7.2f}–{row['max']:<7.2f} {row['ratio']:6.3f} "
              f"{row['ratio_min']:6.3f}–{row['ratio_max']:<6.3f}")
    figures = {"per_round_samples_per_s": {k: [round(x, 3) for x in v] for k, v in per_round.items()},
               "summary": {k: {f: round(x, 4) for f, x in row.items()} for k, row in table.items()},
               "rounds": args.rounds, "steps": args.steps, "skip": args.skip, "batch": args.batch,
               "image_size": args.image_size, "threads": args.threads, "load_average": os.getloadavg(),
               "seconds": round(time.perf_counter() - t_start, 1)}
    print(json.dumps(figures))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
