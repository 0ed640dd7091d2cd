"""Input corruption for the pre-training tasks (MLM, MVM) and ITM negative sampling.

Every function takes an explicit ``torch.Generator`` (None = torch's global RNG) so masking and negatives
replay exactly. Random numbers are drawn on the generator's device and moved to the data's device.
"""

from __future__ import annotations

import torch

from soho.config import PretrainConfig, TransformerConfig


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def _randint(
    low: int, high: int, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device
):
    gen_device = generator.device if generator is not None else device
    return torch.randint(low, high, shape, generator=generator, device=gen_device).to(device)


def mask_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    tcfg: TransformerConfig,
    pcfg: PretrainConfig,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MLM corruption (BERT): choose ``mlm_prob`` of the real caption tokens ([CLS]/[SEP]/[PAD] never);
    of those 80 % → [MASK], 10 % → a random regular token, 10 % unchanged.

    Returns (corrupted ids (B, T), labels (B, T) = original id at chosen positions, -100 elsewhere)."""
    ids = input_ids
    special = (ids == tcfg.cls_token_id) | (ids == tcfg.sep_token_id) | (ids == tcfg.pad_token_id)
    candidates = attention_mask.to(torch.bool) & ~special
    shape, dev = tuple(ids.shape), ids.device
    chosen = candidates & (_rand(shape, generator, dev) < pcfg.mlm_prob)
    action = _rand(shape, generator, dev)
    to_mask = chosen & (action < pcfg.mlm_mask_ratio)
    to_random = (
        chosen & (action >= pcfg.mlm_mask_ratio) & (action < pcfg.mlm_mask_ratio + pcfg.mlm_random_ratio)
    )
    random_ids = _randint(tcfg.first_regular_token_id, tcfg.vocab_size, shape, generator, dev)
    corrupted = torch.where(to_mask, torch.full_like(ids, tcfg.mask_token_id), ids)
    corrupted = torch.where(to_random, random_ids, corrupted)
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    return corrupted, labels


def mask_visual(
    indices: torch.Tensor,
    visual_mask: torch.Tensor,
    num_codes: int,
    prob: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """VD-based MVM: for each sample, with probability ``prob``, pick one VD index uniformly among the
    distinct indices present on its real tokens and mask *every* real token mapped to it (neighbouring
    tokens often share an index, so masking one would let the model copy its neighbour).

    indices, visual_mask: (B, L). Returns (masked (B, L) bool, picked (B,) long, -1 where not masked)."""
    b, _ = indices.shape
    dev = indices.device
    present = torch.zeros(b, num_codes, device=dev)
    present.scatter_add_(1, indices, visual_mask.to(present.dtype))  # (B, k) token count per index
    present = present > 0
    # Uniform choice among present indices: argmax of uniform noise restricted to them.
    noise = _rand((b, num_codes), generator, dev)
    picked = torch.where(present, noise, torch.full_like(noise, -1.0)).argmax(dim=1)  # (B,)
    apply = (_rand((b,), generator, dev) < prob) & present.any(dim=1)
    masked = (indices == picked[:, None]) & visual_mask.to(torch.bool) & apply[:, None]  # (B, L)
    picked = torch.where(apply, picked, torch.full_like(picked, -1))
    return masked, picked


def sample_itm_pairs(
    batch_size: int,
    neg_prob: float,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    similarity: torch.Tensor | None = None,
    temperature: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ITM pairs by in-batch caption swap: image i gets caption ``text_index[i]``; with probability
    ``neg_prob`` that is another sample's caption (a negative, label 0), else its own (label 1).

    Partner choice: uniform over the other samples, or with ``similarity`` (B, B) ∝ exp(sim / temperature)
    over the others (hard negatives). Returns (text_index (B,) long, itm_labels (B,) long)."""
    device = torch.device(device)
    own = torch.arange(batch_size, device=device)
    if batch_size < 2:
        return own, torch.ones(batch_size, dtype=torch.long, device=device)
    negative = _rand((batch_size,), generator, device) < neg_prob
    if similarity is None:
        offset = _randint(1, batch_size, (batch_size,), generator, device)
        partner = (own + offset) % batch_size
    else:
        logits = similarity.detach().float() / temperature
        logits = logits.masked_fill(
            torch.eye(batch_size, dtype=torch.bool, device=logits.device), float("-inf")
        )
        probs = torch.softmax(logits, dim=1)
        gen_device = generator.device if generator is not None else probs.device
        partner = torch.multinomial(probs.to(gen_device), 1, generator=generator).squeeze(1).to(device)
    text_index = torch.where(negative, partner, own)
    return text_index, (~negative).long()
