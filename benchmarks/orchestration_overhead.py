"""What does the orchestration cost? The same model, batches and steps three ways, steady-state samples/s:

  bare     a plain single-process torch loop: loader → SohoForPretraining → AdamW (no DeepSpeed, no Ray)
  worker   our worker loop in one process (DeepSpeed engine, global non-finite check, metrics, history)
  ray      the same worker loop through Ray Train with 1 worker (skip with --no-ray)

Steady state = median per-step samples/s over the steps after the first ``--skip`` (compile-free warm-up,
allocator growth, first shard opens). One run each; prints the ratios (target ≥ 0.95). Checkpointing is
left out of the measured window (only the final checkpoint, after the last measured step).

    python benchmarks/orchestration_overhead.py [--steps 60] [--skip 10] [--no-ray]
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

os.environ.setdefault("DS_ACCELERATOR", "cpu")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from orchestration.pretrain.config import RunConfig  # noqa: E402
from orchestration.pretrain.worker import step_generator  # noqa: E402
from orchestration.runtime.schedule import apply_lr, param_groups  # noqa: E402


def bare_loop(cfg: RunConfig, data_url: str) -> list[float]:
    """Per-step samples/s of a plain torch loop over the very same loader stream."""
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
    rates = []
    for step in range(cfg.optim.max_steps):
        t0 = time.perf_counter()
        apply_lr(opt, specs, cfg.optim, step, frozen=step < cfg.optim.freeze_backbone_steps)  # the worker's cold start
        batch = next(it)
        out = model(batch["pixel_values"], batch["pixel_mask"], batch["input_ids"], batch["attention_mask"],
                    generator=step_generator(cfg.seed, step, 0))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        rates.append(cfg.scale.micro_batch_size / (time.perf_counter() - t0))
    return rates


def worker_loop(cfg: RunConfig, data_url: str) -> list[float]:
    from orchestration.pretrain.launch import launch_local

    summary = launch_local(cfg, data_url)
    return [r["samples_per_s"] for r in summary["worker"]["history"]]


def ray_loop(cfg: RunConfig, data_url: str) -> list[float]:
    from orchestration.pretrain.launch import launch_ray

    launch_ray(cfg, data_url)
    # the per-step history lives in the run's history log beside the checkpoints
    from orchestration.runtime.checkpoint import read_history

    hist = read_history(cfg.checkpoint.storage_path, cfg.name, storage_options=cfg.storage_options())
    return [r["samples_per_s"] for r in hist]


def steady(rates: list[float], skip: int) -> float:
    return statistics.median(rates[skip:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--skip", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=96)
    ap.add_argument("--threads", type=int, default=1, help="torch threads in every variant (same budget)")
    ap.add_argument("--no-ray", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    work = Path(tempfile.mkdtemp(prefix="soho-overhead-"))
    from data_pipeline.synth import make_synthetic

    synth = make_synthetic(str(work / "synth"), num=512, seed=0, image_size=128)
    data_url = synth.get("pretrain_manifest") or str(work / "synth" / "pretrain" / "manifest.json")
    base = RunConfig.of(launcher="local", num_workers=1, zero_stage=0, micro_batch_size=args.batch,
                     image_size=args.image_size, max_steps=args.steps, checkpoint_every=10**6,
                     metrics_port=-1, storage_path=str(work / "runs"), log_every=10**6, data=data_url,
                     cpus_per_worker=args.threads)
    # One process group for both in-process worker runs: DeepSpeed's comm layer keeps the first group it saw.
    from orchestration.runtime.distributed import ensure_process_group

    ensure_process_group(use_gpu=False)
    results: dict[str, float] = {}
    results["bare"] = steady(bare_loop(base, data_url), args.skip)
    print(f"bare torch loop:          {results['bare']:.2f} samples/s", flush=True)
    for stage in (0, 2):
        key = f"worker_zero{stage}"
        results[key] = steady(worker_loop(base.replace(zero_stage=stage, run_name=f"w{stage}"), data_url),
                              args.skip)
        print(f"worker loop, ZeRO-{stage}:      {results[key]:.2f} samples/s "
              f"(ratio {results[key] / results['bare']:.3f})", flush=True)
    if not args.no_ray:
        results["ray_zero2"] = steady(ray_loop(base.replace(launcher="ray", zero_stage=2, run_name="ray"),
                                               data_url), args.skip)
        print(f"Ray Train, 1 worker, ZeRO-2: {results['ray_zero2']:.2f} samples/s "
              f"(ratio {results['ray_zero2'] / results['bare']:.3f})", flush=True)
    ratios = {k: round(v / results["bare"], 3) for k, v in results.items() if k != "bare"}
    print(json.dumps({"samples_per_s": {k: round(v, 2) for k, v in results.items()},
                      "ratio_vs_bare": ratios, "steps": args.steps, "skip": args.skip, "batch": args.batch,
                      "image_size": args.image_size, "threads": args.threads}))


if __name__ == "__main__":
    main()
