"""Worker for test_vd_distributed.py, in its own plain module so that torch.multiprocessing's spawn can
import it by name (test modules are imported with pytest's importlib mode)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from soho import VDConfig, VisualDictionary

NUM_STEPS = 6
CFG = dict(num_codes=32, dim=8, decay=0.8, restart_dead_codes=True, dead_code_window=3)


def make_vd() -> VisualDictionary:
    torch.manual_seed(1234)  # same initial codebook on every rank
    vd = VisualDictionary(VDConfig(**CFG)).train()
    vd.codebook[24:] += 50.0  # unreachable codes, so dead-code restart happens during the run
    return vd


def rank_batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Different features (and padding) for each rank and step."""
    g = torch.Generator().manual_seed(100 * step + rank)
    feats = torch.randn(3, 10, 8, generator=g) + rank
    mask = torch.rand(3, 10, generator=g) > 0.2
    return feats, mask


def worker(rank: int, world_size: int, init_method: str, out_path: str) -> None:
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    try:
        calls = []

        def all_reduce(t: torch.Tensor) -> None:
            calls.append(tuple(t.shape))
            dist.all_reduce(t)

        vd = make_vd()
        vd.reduce_fn = all_reduce
        for step in range(NUM_STEPS):
            vd(*rank_batch(rank, step))
        torch.save(
            {"codebook": vd.codebook, "last_used": vd.last_used, "calls": torch.tensor(calls)},
            f"{out_path}.{rank}",
        )
    finally:
        dist.destroy_process_group()
