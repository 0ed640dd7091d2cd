"""One-GPU training-step benchmark: the base preset (ResNet-101 + 12-layer BERT-base width, k=2048) in bf16.

No Ray, no data pipeline, no network: random pixels/tokens shaped like the paper's batches (default 384×384
images → 6×6 visual tokens at stride 64, 40 text tokens) so the figure is the model + optimizer step alone.
Text weights are randomly initialised (FLOPs do not depend on them; the hub is unreachable on the GPU host).

Engines:
  torch      (default) bf16 weights, fp32 VD, fused AdamW — needs only torch/torchvision/transformers.
  deepspeed  our worker loop's engine (DeepSpeed ZeRO-`--zero-stage`, bf16), when deepspeed is installed.

Prints pairs/s and model FLOPs utilisation (FLOPs of one step counted by ``torch.utils.flop_counter`` on
the real model, divided by the GPU's dense bf16 peak). Budget: well under 4 minutes on an H100/H200.

    python benchmarks/gpu_train_step.py [--batch 64] [--steps 30] [--engine torch|deepspeed]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

# Dense bf16 tensor-core peaks (FLOP/s) from NVIDIA's data sheets (SXM parts).
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}


def peak_flops(name: str) -> float | None:
    for key, value in PEAK_BF16.items():
        if key in name:
            return value
    return None


def make_batch(batch: int, image: int, text: int, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (batch, text), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    return {
        "pixel_values": torch.randn(batch, 3, image, image, generator=g).to(device),
        "pixel_mask": torch.ones(batch, image, image, dtype=torch.bool).to(device),
        "input_ids": ids.to(device),
        "attention_mask": torch.ones(batch, text, dtype=torch.long).to(device),
    }


def build_model(device: torch.device, preset: str = "base") -> torch.nn.Module:
    from soho import SohoForPretraining, get_preset

    cfg = get_preset(preset)
    cfg.transformer.name_or_path = None  # random init: same architecture and FLOPs, no hub download
    cfg.encoder.weights = None  # nor an ImageNet download for the trunk
    torch.manual_seed(0)
    return SohoForPretraining(cfg).to(device)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def count_step_flops(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    g = torch.Generator().manual_seed(1)
    with FlopCounterMode(display=False) as counter:
        out = model(**batch, generator=g)
        out.loss.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def run_torch(model: torch.nn.Module, batch: dict[str, torch.Tensor], steps: int, warmup: int) -> float:
    model = model.to(torch.bfloat16)  # the VD keeps its fp32 buffers (its _apply override)
    batch = {**batch, "pixel_values": batch["pixel_values"].to(torch.bfloat16)}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=torch.cuda.is_available())
    model.train()
    times = []
    for i in range(warmup + steps):
        _sync()
        t0 = time.perf_counter()
        out = model(**batch, generator=torch.Generator().manual_seed(i))
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def run_deepspeed(model: torch.nn.Module, batch: dict[str, torch.Tensor], steps: int, warmup: int,
                  zero_stage: int) -> float:
    import deepspeed

    from orchestration.pretrain.config import RunConfig
    from orchestration.runtime.distributed import ensure_process_group
    from orchestration.runtime.ds_config import build_deepspeed_config
    from orchestration.runtime.schedule import param_groups

    cfg = RunConfig.of(launcher="local", use_gpu=True, precision="bf16", zero_stage=zero_stage,
                    micro_batch_size=batch["input_ids"].shape[0], metrics_port=-1)
    ensure_process_group(use_gpu=True)
    model = model.to(torch.bfloat16)
    groups, _ = param_groups(model, cfg.optim)
    opt = torch.optim.AdamW(groups, lr=1e-4, fused=True)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt,
                                           config=build_deepspeed_config(cfg.scale, cfg.optim, 1),
                                           dist_init_required=False)
    batch = {**batch, "pixel_values": batch["pixel_values"].to(torch.bfloat16)}
    times = []
    for i in range(warmup + steps):
        _sync()
        t0 = time.perf_counter()
        out = engine(**batch, generator=torch.Generator().manual_seed(i))
        engine.backward(out.loss)
        engine.step()
        _sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64, help="pairs per step")
    ap.add_argument("--image-size", type=int, default=384)
    ap.add_argument("--text-len", type=int, default=40)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--engine", choices=("torch", "deepspeed"), default="torch")
    ap.add_argument("--zero-stage", type=int, default=2)
    ap.add_argument("--preset", default="base", help="model preset (base = the paper's model)")
    ap.add_argument("--cpu-smoke", action="store_true", help="run on CPU (code-path check only; no MFU)")
    args = ap.parse_args()
    if not torch.cuda.is_available() and not args.cpu_smoke:
        raise SystemExit("gpu_train_step.py needs a CUDA GPU (none found); "
                         "use --cpu-smoke for a code-path check")
    if args.cpu_smoke and args.engine == "deepspeed":
        raise SystemExit("--cpu-smoke supports --engine torch only")
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    name = "cpu" if args.cpu_smoke else torch.cuda.get_device_name(0)
    t_start = time.perf_counter()
    model = build_model(device, args.preset)
    batch = make_batch(args.batch, args.image_size, args.text_len, device)
    flops = count_step_flops(model, batch)  # fp32 count of the same graph = the bf16 step's FLOPs
    if args.engine == "torch":
        step_s = run_torch(model, batch, args.steps, args.warmup)
    else:
        step_s = run_deepspeed(model, batch, args.steps, args.warmup, args.zero_stage)
    peak = peak_flops(name)
    result = {
        "gpu": name,
        "engine": args.engine,
        "preset": args.preset,
        "precision": "bf16",
        "batch": args.batch,
        "image_size": args.image_size,
        "text_len": args.text_len,
        "median_step_s": round(step_s, 4),
        "pairs_per_s": round(args.batch / step_s, 1),
        "tflops_per_step": round(flops / 1e12, 3),
        "achieved_tflops": round(flops / step_s / 1e12, 1),
        "mfu": round(flops / step_s / peak, 3) if peak else None,
        "peak_bf16_tflops": peak / 1e12 if peak else None,
        "max_memory_gib": (round(torch.cuda.max_memory_allocated() / 2**30, 2)
                           if device.type == "cuda" else None),
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    print(f"{name}: {result['pairs_per_s']} pairs/s, MFU {result['mfu']}, {result['median_step_s']} s/step")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
