"""Hand-made cases for the downstream metrics, losses and the two-stage retrieval ranking."""

from __future__ import annotations

import math

import pytest
import torch

from soho.downstream.heads import ContrastiveProjection, MLPClassifier, info_nce_loss, vqa_bce_loss
from soho.downstream.metrics import (
    accuracy,
    normalize_vqa_answer,
    ranks_of_ground_truth,
    recall_at_k,
    retrieval_recalls,
    vqa_answer_score,
    vqa_soft_accuracy,
)
from soho.downstream.retrieval import exhaustive_retrieval, prefilter_rerank_retrieval


@pytest.mark.parametrize(
    ("matches", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (7, 1.0), (10, 1.0)]
)
def test_vqa_answer_score_leave_one_out(matches: int, expected: float) -> None:
    assert vqa_answer_score(matches, 10) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("raw", "norm"),
    [("Two.", "2"), ("the dog", "dog"), ("1,000", "1000"), ("dont", "don't"), ("2.5", "2.5"), ("Yes!", "yes"),
     ("an apple ", "apple"), ("red-white", "red white")],
)  # fmt: skip
def test_normalize_vqa_answer(raw: str, norm: str) -> None:
    assert normalize_vqa_answer(raw) == norm


def test_vqa_soft_accuracy_known_answers() -> None:
    humans = [
        ["2"] * 2 + ["3"] * 8,  # "two" matches 2 of 10 → 0.6
        ["yes"] * 10,  # "Yes." → 1.0
        ["dog"] * 3 + ["cat"] * 7,  # "cat" matches 7 → 1.0
        ["red"] * 9 + ["blue"],  # "blue" matches 1 → 0.3
        ["circle"] * 10,  # "square" → 0
    ]
    preds = ["two", "Yes.", "cat", "blue", "square"]
    assert vqa_soft_accuracy(preds, humans) == pytest.approx((0.6 + 1.0 + 1.0 + 0.3 + 0.0) / 5)
    with pytest.raises(ValueError, match="2 predictions for 5 questions"):
        vqa_soft_accuracy(preds[:2], humans)


def test_accuracy_counts_argmax_hits() -> None:
    logits = torch.tensor([[0.1, 0.9, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.5, 0.4, 0.1]])
    assert accuracy(logits, torch.tensor([1, 0, 0, 1])) == pytest.approx(0.5)


def test_recall_for_known_score_matrix() -> None:
    # 3 images, 4 captions: captions 0,1 describe image 0; caption 2 image 1; caption 3 image 2.
    image_of_text = torch.tensor([0, 0, 1, 2])
    scores = torch.tensor(
        [
            [0.1, 0.8, 0.9, 0.0],  # image 0: best positive (t1, 0.8) beaten by t2 → rank 1
            [0.5, 0.4, 0.6, 0.7],  # image 1: positive t2 (0.6) beaten by t3 → rank 1
            [0.0, 0.1, 0.2, 0.3],  # image 2: positive t3 is best → rank 0
        ]
    )
    ranks_i2t = ranks_of_ground_truth(scores, image_of_text.unsqueeze(0) == torch.arange(3).unsqueeze(1))
    assert ranks_i2t.tolist() == [1, 1, 0]
    # t2i: t0 (col 0.1, 0.5, 0.0 → image0 rank 1), t1 (0.8 best → 0), t2 (0.9, 0.6, 0.2 → image1 rank 1),
    # t3 (0.0, 0.7, 0.3 → image2 rank 1)
    rec = retrieval_recalls(scores, image_of_text, ks=(1, 2))
    assert rec["i2t"] == {1: pytest.approx(100 / 3), 2: pytest.approx(100.0)}
    assert rec["t2i"] == {1: pytest.approx(25.0), 2: pytest.approx(100.0)}
    assert recall_at_k(torch.tensor([0, 4, 9, 10]), ks=(1, 5, 10)) == {1: 25.0, 5: 50.0, 10: 75.0}


def test_vqa_bce_loss_sums_over_answers() -> None:
    logits = torch.zeros(2, 5)
    target = torch.tensor([[1.0, 0.3, 0, 0, 0], [0, 0, 0.6, 0, 1.0]])
    # sigmoid(0) = 0.5 → every entry costs log 2, whatever the soft target.
    assert vqa_bce_loss(logits, target).item() == pytest.approx(5 * math.log(2), rel=1e-6)
    logits = torch.tensor([[3.0, -1.0]])
    target = torch.tensor([[1.0, 0.3]])
    expected = -math.log(1 / (1 + math.exp(-3))) - (
        0.3 * math.log(1 / (1 + math.exp(1))) + 0.7 * math.log(1 - 1 / (1 + math.exp(1)))
    )
    assert vqa_bce_loss(logits, target).item() == pytest.approx(expected, rel=1e-5)


def test_info_nce_matches_hand_computation() -> None:
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    scale = torch.tensor(2.0)
    sim = 2.0 * img @ txt.t()  # [[2, 1.2], [0, 1.6]]
    row = -(sim.diag() - sim.logsumexp(1)).mean()
    col = -(sim.diag() - sim.logsumexp(0)).mean()
    assert info_nce_loss(img, txt, scale).item() == pytest.approx(0.5 * (row + col).item(), rel=1e-6)
    proj = ContrastiveProjection(4, 6, embed_dim=3)
    emb = proj.embed_image(torch.randn(5, 4))
    assert emb.shape == (5, 3) and torch.allclose(emb.norm(dim=-1), torch.ones(5))
    assert proj.logit_scale().item() == pytest.approx(1 / 0.07, rel=1e-4)


def test_mlp_classifier_shapes_and_bad_sizes() -> None:
    head = MLPClassifier(8, 3)
    assert head(torch.randn(4, 8)).shape == (4, 3)
    with pytest.raises(ValueError, match="num_classes=0"):
        MLPClassifier(8, 0)


def _matrix_scorer(scores: torch.Tensor):
    calls = {"pairs": 0}

    def fn(img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        calls["pairs"] += img.numel()
        return scores[img, txt]

    return fn, calls


def test_prefilter_with_k_equal_n_equals_exhaustive() -> None:
    g = torch.Generator().manual_seed(0)
    n_img, per = 12, 2
    image_of_text = torch.arange(n_img).repeat_interleave(per)
    scores = torch.randn(n_img, n_img * per, generator=g)
    scores[image_of_text, torch.arange(n_img * per)] += 1.5  # a model that is right more often than not
    fn, calls = _matrix_scorer(scores)
    exhaustive, matrix = exhaustive_retrieval(fn, image_of_text, n_img, batch_size=7)
    assert torch.equal(matrix, scores) and calls["pairs"] == n_img * n_img * per
    assert exhaustive.recalls == retrieval_recalls(scores, image_of_text)
    img_emb = torch.nn.functional.normalize(torch.randn(n_img, 4, generator=g), dim=-1)
    txt_emb = torch.nn.functional.normalize(torch.randn(n_img * per, 4, generator=g), dim=-1)
    fast = prefilter_rerank_retrieval(fn, img_emb, txt_emb, image_of_text, k=n_img * per, batch_size=5)
    for d in ("i2t", "t2i"):
        assert torch.equal(fast.ranks[d], exhaustive.ranks[d])
    assert fast.recalls == exhaustive.recalls
    assert fast.pairs_scored == n_img * n_img * per  # each pair once although it is a candidate both ways


def test_prefilter_ranks_candidates_first_then_prefilter_order() -> None:
    # 4 images with one caption each; ITM prefers the truth everywhere (itm[i, t] = 5·[i == t] + t), the
    # prefilter is imperfect: sim(image i, text t) = txt_emb[t, i].
    image_of_text = torch.arange(4)
    itm = torch.eye(4) * 5 + torch.arange(4, dtype=torch.float32).unsqueeze(0)
    img_emb = torch.eye(4)
    txt_emb = torch.tensor([[0.5, 0.8, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0], [0.9, 0.3, 0, 0.1]])
    fn, calls = _matrix_scorer(itm)
    fast = prefilter_rerank_retrieval(fn, img_emb, txt_emb, image_of_text, k=1, ks=(1, 2, 3))
    # k=1 — image 0's top-1 is text 3, its caption text 0 is next by similarity → rank 1.
    # text 0's top-1 is image 1 → rank 1; text 3's top-1 is image 0, then image 1 (0.3) beats image 3 (0.1)
    # in the prefilter order → rank 2.
    assert fast.ranks["i2t"].tolist() == [1, 0, 0, 0]
    assert fast.ranks["t2i"].tolist() == [1, 0, 0, 2]
    assert fast.recalls["t2i"] == {1: 50.0, 2: 75.0, 3: 100.0}
    assert fast.pairs_scored == calls["pairs"] <= 8
    # k=2 — ITM reranks image 0's candidates (text 3: 3, text 0: 5) and text 0's (image 1: 0, image 0: 5)
    # so both hits move to rank 0; text 3's image is still outside its top-2 → 2 + 0 better non-candidates.
    fast = prefilter_rerank_retrieval(fn, img_emb, txt_emb, image_of_text, k=2, ks=(1, 2, 3))
    assert fast.ranks["i2t"].tolist() == [0, 0, 0, 0]
    assert fast.ranks["t2i"].tolist() == [0, 0, 0, 2]
    assert fast.recalls["t2i"] == {1: 75.0, 2: 75.0, 3: 100.0}
