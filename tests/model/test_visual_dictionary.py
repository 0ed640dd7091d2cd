"""VisualDictionary: the paper's moving-average update, straight-through gradient, dtype policy, health."""

from __future__ import annotations

import math

import pytest
import torch

from soho import VDConfig, VisualDictionary


def _vd(codes: list[list[float]], decay: float = 0.5, **kw) -> VisualDictionary:
    cb = torch.tensor(codes)
    vd = VisualDictionary(VDConfig(num_codes=cb.shape[0], dim=cb.shape[1], decay=decay, **kw))
    vd.codebook.copy_(cb)
    return vd


def test_ema_matches_hand_computation_and_ignores_masked_positions() -> None:
    vd = _vd([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], decay=0.5).train()
    # Sample 0: two features near code 0, one near code 1. Sample 1: a masked feature that would hit code 1,
    # and a real one near code 0.
    feats = torch.tensor([[[1.0, 0.0], [-1.0, 2.0], [9.0, 1.0]], [[50.0, 0.0], [0.0, 1.0], [0.0, 0.0]]])
    mask = torch.tensor([[True, True, True], [False, True, False]])
    out = vd(feats, mask)
    assert out.indices.tolist() == [[0, 0, 1], [1, 0, 0]]
    # Forward value = the codes before this step's update.
    assert torch.equal(out.quantized[0, 2], torch.tensor([10.0, 0.0]))
    # d0 ← 0.5·(0,0) + 0.5·mean((1,0), (−1,2), (0,1)) = (0, 0.5); d1 ← 0.5·(10,0) + 0.5·(9,1) = (9.5, 0.5).
    # The masked (50,0) must not pull d1, the masked (0,0) must not count in d0's mean; d2 has no feature.
    expected = torch.tensor([[0.0, 0.5], [9.5, 0.5], [0.0, 10.0]])
    torch.testing.assert_close(vd.codebook, expected, rtol=0, atol=1e-6)
    assert vd.last_used.tolist() == [0, 0, -1]
    assert int(vd.num_updates) == 1


def test_eval_mode_never_updates() -> None:
    vd = _vd([[0.0, 0.0], [10.0, 0.0]]).eval()
    before = vd.codebook.clone()
    vd(torch.randn(2, 5, 2))
    assert torch.equal(vd.codebook, before)
    assert int(vd.num_updates) == 0


def test_unassigned_codes_are_bit_identical_over_steps() -> None:
    torch.manual_seed(0)
    vd = VisualDictionary(VDConfig(num_codes=16, dim=8, decay=0.9)).train()
    far = vd.codebook[8:].clone() + 1000.0
    vd.codebook[8:] = far  # codes 8.. can never win against features of scale 1
    for _ in range(5):
        out = vd(torch.randn(4, 10, 8))
        assert int(out.indices.max()) < 8
    assert torch.equal(vd.codebook[8:], far)


def test_straight_through_value_and_gradient() -> None:
    torch.manual_seed(1)
    vd = VisualDictionary(VDConfig(num_codes=32, dim=6)).train()
    feats = torch.randn(3, 7, 6, requires_grad=True)
    codebook_before = vd.codebook.clone()
    out = vd(feats)
    assert torch.equal(out.quantized.detach(), codebook_before[out.indices])
    upstream = torch.randn(3, 7, 6)
    out.quantized.backward(upstream)
    assert torch.equal(feats.grad, upstream)


def test_bf16_features_fp32_codebook_and_dtype_casts() -> None:
    torch.manual_seed(2)
    vd = VisualDictionary(VDConfig(num_codes=16, dim=8)).train()
    exact = vd.codebook.clone()
    vd.bfloat16()  # what DeepSpeed does to the whole model
    assert vd.codebook.dtype == torch.float32 and torch.equal(vd.codebook, exact)
    vd.half()
    assert vd.codebook.dtype == torch.float32 and torch.equal(vd.codebook, exact)
    feats = torch.randn(2, 5, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vd(feats)
    assert out.quantized.dtype == torch.bfloat16
    assert vd.codebook.dtype == torch.float32
    # The update was computed in fp32 from the bf16 features.
    x = feats.float().reshape(-1, 8)
    idx = out.indices.reshape(-1)
    for j in idx.unique().tolist():
        mean = x[idx == j].mean(0)
        torch.testing.assert_close(vd.codebook[j], 0.99 * exact[j] + 0.01 * mean, rtol=0, atol=1e-6)


def test_decay_warmup_schedule() -> None:
    vd = VisualDictionary(
        VDConfig(num_codes=4, dim=2, decay=0.9, decay_warmup_steps=4, decay_warmup_start=0.5)
    )
    seen = []
    for _ in range(6):
        seen.append(vd.current_decay())
        vd(torch.randn(1, 3, 2))
    assert seen == pytest.approx([0.5, 0.6, 0.7, 0.8, 0.9, 0.9])


def test_health_statistics() -> None:
    vd = _vd(
        [[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [-10.0, 0.0]], decay=0.5, usage_window=3, dead_code_window=3
    )
    assert vd.health() == {"usage_ratio": 0.0, "perplexity": 0.0, "dead_codes": 0, "decay": 0.5}
    # Two codes used equally every step → perplexity 2 (the histogram stays exactly uniform over them).
    feats = torch.tensor([[[0.1, 0.0], [9.9, 0.0]]])
    for _ in range(4):
        vd(feats)
    h = vd.health()
    assert h["usage_ratio"] == 0.5
    assert h["perplexity"] == pytest.approx(2.0, rel=1e-5)
    assert h["dead_codes"] == 2  # codes 2 and 3 never used in 4 ≥ 3 updates


def test_dead_code_restart_reseeds_from_batch_means_deterministically() -> None:
    def run() -> torch.Tensor:
        torch.manual_seed(3)
        vd = VisualDictionary(VDConfig(num_codes=8, dim=4, restart_dead_codes=True, dead_code_window=2))
        vd.codebook[4:] += 100.0  # codes 4..7 are unreachable → dead after 2 updates
        gen = torch.Generator().manual_seed(5)
        for _ in range(2):
            vd(torch.randn(2, 16, 4, generator=gen))
        return vd

    a, b = run(), run()
    assert torch.equal(a.codebook, b.codebook)
    # Re-seeded codes now sit near the features (scale ~1), not at +100.
    assert a.codebook[4:].abs().max() < 10
    assert a.health()["dead_codes"] == 0


def test_bad_input_is_named() -> None:
    vd = VisualDictionary(VDConfig(num_codes=4, dim=3))
    with pytest.raises(ValueError, match="features must be"):
        vd(torch.randn(2, 3))
    with pytest.raises(ValueError, match="mask must be"):
        vd(torch.randn(2, 5, 3), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="num_codes"):
        VDConfig(num_codes=1).validate()
    assert math.isfinite(vd.current_decay())


def test_blocked_row_argmax_equals_argmax_with_ties_and_nan() -> None:
    from soho.visual_dictionary import _row_argmax

    g = torch.Generator().manual_seed(4)
    scores = torch.randint(0, 3, (64, 256), generator=g).float()  # many ties: the first maximum must win
    scores[5, 200] = float("nan")  # argmax picks the NaN
    scores[6, 3] = scores[6, 190] = 9.0
    scores[7, 130] = scores[7, 129] = float("nan")  # two NaNs in one block: the first
    assert torch.equal(_row_argmax(scores), scores.argmax(dim=1))
    assert _row_argmax(scores)[5] == 200 and _row_argmax(scores)[6] == 3 and _row_argmax(scores)[7] == 129
    for k in (40, 13):  # blocks of 8; no block divides k: plain argmax
        odd = torch.randn(7, k, generator=g)
        assert torch.equal(_row_argmax(odd), odd.argmax(dim=1))
    big = torch.randn(3200, 2048, generator=g)  # the benchmark's shape
    assert torch.equal(_row_argmax(big), big.argmax(dim=1))


def test_lookup_equals_the_exhaustive_distance_argmin() -> None:
    """The folded (N, k) lookup picks the code of least squared distance, like the plain formula."""
    g = torch.Generator().manual_seed(9)
    vd = VisualDictionary(VDConfig(num_codes=256, dim=32))
    flat = torch.randn(500, 32, generator=g)
    want = torch.cdist(flat.double(), vd.codebook.double()).argmin(dim=1)
    assert torch.equal(vd.lookup(flat), want)


def test_reduce_fn_sees_packed_sums_and_counts_once_per_step() -> None:
    vd = _vd([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], decay=0.5).train()
    seen: list[torch.Tensor] = []
    vd.reduce_fn = lambda t: seen.append(t.clone())
    feats = torch.tensor([[[1.0, 0.0], [-1.0, 2.0], [9.0, 1.0]], [[50.0, 0.0], [0.0, 1.0], [0.0, 0.0]]])
    vd(feats, torch.tensor([[True, True, True], [False, True, False]]))
    assert len(seen) == 1
    # Rows: code j's [Σ v | count] over the real positions assigned to it.
    assert seen[0].tolist() == [[0.0, 3.0, 3.0], [9.0, 1.0, 1.0], [0.0, 0.0, 0.0]]
