"""MLM / MVM corruption and ITM pair sampling: exact masks, ratios, replay from the generator."""

from __future__ import annotations

import torch

from soho import PretrainConfig, TransformerConfig
from soho.masking import mask_tokens, mask_visual, sample_itm_pairs

TCFG = TransformerConfig()


def test_mvm_masks_every_position_of_the_chosen_index_and_no_other() -> None:
    g = torch.Generator().manual_seed(0)
    indices = torch.tensor(
        [
            [3, 3, 5, 7, 3, 5, 9, 9],
            [1, 2, 1, 2, 1, 2, 4, 4],
            [6, 6, 6, 6, 6, 6, 6, 6],
        ]
    )
    # Sample 1 pads its last two tokens (index 4 there must never be chosen or masked).
    visual_mask = torch.tensor([[True] * 8, [True] * 6 + [False] * 2, [True] * 8])
    seen: set[tuple[int, int]] = set()
    for _ in range(60):
        masked, picked = mask_visual(indices, visual_mask, num_codes=10, prob=1.0, generator=g)
        for b in range(3):
            j = int(picked[b])
            present = set(indices[b][visual_mask[b]].tolist())
            assert j in present
            assert torch.equal(masked[b], (indices[b] == j) & visual_mask[b])
            seen.add((b, j))
    # The choice is random over the indices present: every one shows up.
    assert seen == {(0, 3), (0, 5), (0, 7), (0, 9), (1, 1), (1, 2), (2, 6)}


def test_mvm_probability_and_replay() -> None:
    indices = torch.randint(0, 16, (4000, 12), generator=torch.Generator().manual_seed(1))
    vm = torch.ones(4000, 12, dtype=torch.bool)
    masked, picked = mask_visual(indices, vm, 16, prob=0.3, generator=torch.Generator().manual_seed(2))
    frac = (picked >= 0).float().mean().item()
    assert abs(frac - 0.3) < 0.03
    assert torch.equal(masked.any(1), picked >= 0)
    again, _ = mask_visual(indices, vm, 16, prob=0.3, generator=torch.Generator().manual_seed(2))
    assert torch.equal(masked, again)


def test_mlm_ratios_and_special_tokens() -> None:
    g = torch.Generator().manual_seed(0)
    b, t = 512, 40
    ids = torch.randint(1000, 30000, (b, t), generator=g)
    ids[:, 0] = TCFG.cls_token_id
    lengths = torch.randint(10, t, (b,), generator=g)
    am = (torch.arange(t)[None] < lengths[:, None]).long()
    ids[torch.arange(b), lengths - 1] = TCFG.sep_token_id
    ids[am == 0] = TCFG.pad_token_id
    pcfg = PretrainConfig()
    corrupted, labels = mask_tokens(ids, am, TCFG, pcfg, generator=torch.Generator().manual_seed(3))

    chosen = labels != -100
    special = (ids == TCFG.cls_token_id) | (ids == TCFG.sep_token_id) | (am == 0)
    assert not (chosen & special).any()
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(corrupted[~chosen], ids[~chosen])
    candidates = (~special).sum().item()
    n = chosen.sum().item()
    assert abs(n / candidates - 0.15) < 0.01
    to_mask = (corrupted == TCFG.mask_token_id) & chosen
    kept = (corrupted == ids) & chosen
    randomised = chosen & ~to_mask & ~kept
    assert abs(to_mask.sum().item() / n - 0.8) < 0.03
    assert abs(randomised.sum().item() / n - 0.1) < 0.02
    assert abs(kept.sum().item() / n - 0.1) < 0.02  # includes the rare random draw equal to the original
    assert (corrupted[randomised] >= TCFG.first_regular_token_id).all()


def test_itm_pairs_swap_with_probability_and_never_self() -> None:
    text_index, labels = sample_itm_pairs(4000, 0.5, torch.Generator().manual_seed(0))
    own = torch.arange(4000)
    assert torch.equal(labels == 1, text_index == own)
    assert abs((labels == 0).float().mean().item() - 0.5) < 0.03
    single, single_labels = sample_itm_pairs(1, 0.5, torch.Generator().manual_seed(0))
    assert single.tolist() == [0] and single_labels.tolist() == [1]


def test_hard_negatives_follow_similarity() -> None:
    # Samples 0/1 and 2/3 are near-duplicates: hard negatives pair them with each other.
    sim = torch.tensor(
        [[1.0, 0.99, 0.0, 0.0], [0.99, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.98], [0.0, 0.0, 0.98, 1.0]]
    )
    g = torch.Generator().manual_seed(0)
    partners = {0: 1, 1: 0, 2: 3, 3: 2}
    for _ in range(20):
        text_index, labels = sample_itm_pairs(4, 1.0, g, similarity=sim, temperature=0.05)
        assert labels.tolist() == [0, 0, 0, 0]
        assert text_index.tolist() == [partners[i] for i in range(4)]
