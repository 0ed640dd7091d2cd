"""The tiny preset learns: 8 synthetic image-caption pairs are overfitted on CPU (ITM accuracy 1.0 on all
matched and swapped pairs, masked-token loss down by more than half) within a bounded number of steps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from soho import SohoForPretraining, soho_tiny

MAX_STEPS = 600
EVAL_EVERY = 20


def _pairs(n: int = 8, size: int = 64, text_len: int = 12) -> dict[str, torch.Tensor]:
    """Distinct checkerboards (own colour and period) with distinct random WordPiece captions."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images = []
    for i in range(n):
        colour = torch.rand(3, 1, 1, generator=g) * 2 - 1
        period = 4 + 2 * i
        board = (((yy // period) + (xx // period)) % 2).float()
        images.append(2 * (colour * board - colour * (1 - board)))
    ids = torch.randint(2000, 8000, (n, text_len), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    return {
        "pixel_values": torch.stack(images),
        "pixel_mask": torch.ones(n, size, size, dtype=torch.bool),
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
    }


@torch.no_grad()
def _itm_accuracy(pt: SohoForPretraining, batch: dict[str, torch.Tensor]) -> float:
    """Every matched pair must score 'match' and every caption-rolled pair 'no match'."""
    pos = pt.itm_logits(**batch).argmax(-1)
    swapped = dict(batch, input_ids=batch["input_ids"].roll(1, 0))
    neg = pt.itm_logits(**swapped).argmax(-1)
    return ((pos == 1).sum() + (neg == 0).sum()).item() / (2 * len(pos))


@torch.no_grad()
def _masked_token_loss(pt: SohoForPretraining, batch: dict[str, torch.Tensor]) -> float:
    """Deterministic MLM loss: each caption word replaced by [MASK] in turn, one sequence per position."""
    ids, am = batch["input_ids"], batch["attention_mask"]
    n, t = ids.shape
    positions = list(range(1, t - 1))
    rep = len(positions)
    masked = ids.repeat_interleave(rep, 0)  # (n·rep, T)
    pos = torch.tensor(positions).repeat(n)  # (n·rep,)
    rows = torch.arange(n * rep)
    targets = masked[rows, pos].clone()
    masked[rows, pos] = pt.config.transformer.mask_token_id
    soho = pt.soho
    feats, vmask, grid = soho.encode_image_grid(batch["pixel_values"], batch["pixel_mask"])
    vd = soho.visual_dictionary(feats, vmask)
    tokens = vd.quantized.repeat_interleave(rep, 0)
    hidden, _ = soho.fuse(masked, am.repeat_interleave(rep, 0), tokens, vmask.repeat_interleave(rep, 0), grid)
    logits = pt.mlm_head(hidden[rows, pos], soho.transformer.word_embeddings.weight)
    return F.cross_entropy(logits, targets).item()


@pytest.mark.slow
def test_tiny_preset_overfits_eight_pairs() -> None:
    torch.manual_seed(0)
    cfg = soho_tiny()
    # Overfitting check: no dropout (it only slows memorisation); everything else is the preset.
    cfg.transformer.hidden_dropout = cfg.transformer.attention_dropout = 0.0
    pt = SohoForPretraining(cfg)
    batch = _pairs()
    pt.eval()
    mlm_start = _masked_token_loss(pt, batch)
    opt = torch.optim.AdamW(pt.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    history = []
    for step in range(1, MAX_STEPS + 1):
        pt.train()
        out = pt(**batch, generator=gen)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        if step % EVAL_EVERY == 0:
            pt.eval()
            acc, mlm = _itm_accuracy(pt, batch), _masked_token_loss(pt, batch)
            history.append((step, acc, mlm))
            if acc == 1.0 and mlm < 0.5 * mlm_start:
                break
    step, acc, mlm = history[-1]
    assert acc == 1.0, f"ITM accuracy {acc} after {step} steps; history {history}"
    assert mlm < 0.5 * mlm_start, f"masked-token loss {mlm:.3f} vs start {mlm_start:.3f}; history {history}"
