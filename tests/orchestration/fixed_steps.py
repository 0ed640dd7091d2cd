"""A fixed tiny batch and N optimizer steps through a built engine, for the subprocess scripts of tests that
compare two ways of building the same engine step for step (imported by those scripts as
``tests.orchestration.fixed_steps``)."""

from __future__ import annotations

from typing import Any

import torch


def fixed_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pixel_values, pixel_mask, input_ids, attention_mask) of 2 random 64×96 images and 10-token texts."""
    g = torch.Generator().manual_seed(5)
    pv, pm = torch.randn(2, 3, 64, 96, generator=g), torch.ones(2, 64, 96, dtype=torch.bool)
    ids = torch.randint(999, 30000, (2, 10), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    return pv, pm, ids, torch.ones_like(ids)


def train_steps(engine: Any, steps: int = 3) -> list[float]:
    """``steps`` forward/backward/step rounds on :func:`fixed_batch` with seeded masking; the losses."""
    batch = fixed_batch()
    losses = []
    for i in range(steps):
        torch.manual_seed(10 + i)
        out = engine(*batch, generator=torch.Generator().manual_seed(i))
        engine.backward(out.loss)
        engine.step()
        losses.append(out.loss.item())
    return losses
