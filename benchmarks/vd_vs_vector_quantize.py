"""VisualDictionary training step vs vector-quantize-pytorch's EMA VectorQuantize vs the bare distance
matrix product (the floor), on CPU.

Same problem for all three: k=2048 codes, c=768, 32 images × 100 tokens; EMA codebook update, no
commitment loss, no k-means init, plain straight-through (vector-quantize-pytorch's rotation trick off).
Prints medians over repeats and the two ratios. Not a test: timings depend on the machine.

    .venv/bin/python benchmarks/vd_vs_vector_quantize.py [--repeats 30] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

from soho import VDConfig, VisualDictionary


def interleaved_medians(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 3
) -> dict[str, float]:
    """Median seconds per function, timed round-robin so that load from other processes hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--codes", type=int, default=2048)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--tokens", type=int, default=100)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from vector_quantize_pytorch import VectorQuantize

    torch.manual_seed(0)
    x = torch.randn(args.batch, args.tokens, args.dim)
    flat = x.reshape(-1, args.dim)

    vd = VisualDictionary(VDConfig(num_codes=args.codes, dim=args.dim, decay=0.99)).train()
    vq = VectorQuantize(
        dim=args.dim,
        codebook_size=args.codes,
        decay=0.99,
        commitment_weight=0.0,
        kmeans_init=False,
        rotation_trick=False,
    ).train()
    codebook = vd.codebook.clone()

    # The workload, asserted before timing: every token looked up and the codebook updated (VD), the same
    # shapes out of vector-quantize-pytorch, and the floor's score matrix.
    with torch.no_grad():
        out = vd(x)
        assert out.quantized.shape == x.shape and out.indices.shape == (args.batch, args.tokens)
        assert int(vd.num_updates) == 1 and not torch.equal(vd.codebook, codebook)
        q, idx, _ = vq(x)
        assert q.shape == x.shape and idx.shape == (args.batch, args.tokens)
        assert (flat @ codebook.t()).shape == (args.batch * args.tokens, args.codes)

    with torch.no_grad():
        med = interleaved_medians(
            {"floor": lambda: flat @ codebook.t(), "vd": lambda: vd(x), "vq": lambda: vq(x)}, args.repeats
        )
    t_floor, t_vd, t_vq = med["floor"], med["vd"], med["vq"]

    print(
        f"torch {torch.__version__}, threads={torch.get_num_threads()}, k={args.codes}, c={args.dim}, "
        f"tokens={args.batch}x{args.tokens}, repeats={args.repeats} (medians), "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print(f"  bare distance matmul      : {t_floor * 1e3:8.2f} ms")
    print(f"  soho VisualDictionary     : {t_vd * 1e3:8.2f} ms")
    print(f"  vector-quantize-pytorch   : {t_vq * 1e3:8.2f} ms")
    print(f"  speed-up vs vector-quantize-pytorch: {t_vq / t_vd:5.2f}x  (target >= 3.5x)")
    print(f"  VD time / bare matmul              : {t_vd / t_floor:5.2f}x  (target <= 1.15x)")
    return {"floor_s": t_floor, "vd_s": t_vd, "vq_s": t_vq}


if __name__ == "__main__":
    main()
