"""Image-text retrieval evaluation: exhaustive ITM ranking and prefilter + rerank.

A fusion model like SOHO scores a pair only by running the cross-modal transformer on it, so exhaustive
evaluation costs N_img × N_txt transformer passes. The fast path ranks all pairs by the cosine similarity
of cheap single-modality embeddings (one pass per image and per text), keeps the top-k candidates per query
in each direction, and reranks only those with the full ITM score (≤ 2·k·N passes). Queries whose positive
falls outside the top-k keep their prefilter order behind the reranked candidates, so recall@K for K ≤ k
is exactly what a user of the two-stage system sees.

Everything here is model-agnostic: the model is reached through `pair_score_fn(image_idx, text_idx)`, which
returns one ITM score per pair (the caller caches image features so each image is encoded once).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from soho.downstream.metrics import ranks_of_ground_truth, recall_at_k

__all__ = [
    "PairScoreFn",
    "RetrievalResult",
    "score_pairs",
    "exhaustive_retrieval",
    "prefilter_topk",
    "prefilter_rerank_retrieval",
]

logger = logging.getLogger(__name__)

PairScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(image_idx (P,), text_idx (P,)) -> ITM score (P,), higher = more likely a match."""


@dataclass
class RetrievalResult:
    """Recall@K per direction ("i2t": image queries texts, "t2i": text queries images), in percent."""

    recalls: dict[str, dict[int, float]]
    ranks: dict[str, torch.Tensor]  # 0-based rank of the best positive per query
    pairs_scored: int  # full ITM passes spent
    seconds: dict[str, float] = field(default_factory=dict)

    def flat(self) -> dict[str, float]:
        """{"i2t_r1": .., "t2i_r10": ..} for results JSON and logs."""
        return {f"{d}_r{k}": v for d, rec in self.recalls.items() for k, v in rec.items()}


def _check_labels(n_img: int, image_of_text: torch.Tensor) -> None:
    if image_of_text.dim() != 1 or image_of_text.dtype != torch.long:
        raise ValueError(
            f"image_of_text must be a 1-D long tensor, got {image_of_text.dtype} {tuple(image_of_text.shape)}"
        )
    if image_of_text.numel() and (int(image_of_text.min()) < 0 or int(image_of_text.max()) >= n_img):
        raise ValueError(f"image_of_text holds image indices outside [0, {n_img})")
    missing = torch.ones(n_img, dtype=torch.bool)
    missing[image_of_text] = False
    if bool(missing.any()):
        raise ValueError(f"images without any caption: {missing.nonzero().flatten()[:5].tolist()} ...")


def score_pairs(
    pair_score_fn: PairScoreFn, image_idx: torch.Tensor, text_idx: torch.Tensor, batch_size: int
) -> torch.Tensor:
    """ITM scores for the given pairs, `batch_size` pairs per call, as float32 on CPU."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    out = torch.empty(image_idx.numel(), dtype=torch.float32)
    for start in range(0, image_idx.numel(), batch_size):
        sl = slice(start, start + batch_size)
        out[sl] = pair_score_fn(image_idx[sl], text_idx[sl]).detach().float().cpu()
    return out


def exhaustive_retrieval(
    pair_score_fn: PairScoreFn,
    image_of_text: torch.Tensor,
    n_img: int,
    ks: Sequence[int] = (1, 5, 10),
    batch_size: int = 256,
) -> tuple[RetrievalResult, torch.Tensor]:
    """Score every image-text pair with ITM; returns the result and the (N_img, N_txt) score matrix."""
    _check_labels(n_img, image_of_text)
    n_txt = image_of_text.numel()
    t0 = time.perf_counter()
    img_idx = torch.arange(n_img).repeat_interleave(n_txt)  # row-major over (image, text)
    txt_idx = torch.arange(n_txt).repeat(n_img)
    scores = score_pairs(pair_score_fn, img_idx, txt_idx, batch_size).view(n_img, n_txt)
    t_itm = time.perf_counter() - t0
    pos = image_of_text.unsqueeze(0) == torch.arange(n_img).unsqueeze(1)  # (N_img, N_txt)
    ranks = {"i2t": ranks_of_ground_truth(scores, pos), "t2i": ranks_of_ground_truth(scores.t(), pos.t())}
    result = RetrievalResult(
        recalls={d: recall_at_k(r, ks) for d, r in ranks.items()},
        ranks=ranks,
        pairs_scored=n_img * n_txt,
        seconds={"itm": t_itm},
    )
    return result, scores


@dataclass
class _Prefiltered:
    candidates: torch.Tensor  # (Q, k) key indices, best similarity first
    positive_in_candidates: torch.Tensor  # (Q,) bool
    # (Q,) rank when the positive is outside the candidates: k + the non-candidates more similar than it
    fallback_rank: torch.Tensor


def prefilter_topk(
    query_emb: torch.Tensor,
    key_emb: torch.Tensor,
    query_labels: torch.Tensor,
    key_labels: torch.Tensor,
    k: int,
    chunk: int = 1024,
) -> _Prefiltered:
    """Top-k keys per query by dot product (cosine for normalised embeddings), in row chunks so memory stays
    O(chunk × N) rather than O(N²). A key is a positive for a query when their labels are equal."""
    n_keys = key_emb.shape[0]
    k = min(k, n_keys)
    cands, pos_in, fallback = [], [], []
    for start in range(0, query_emb.shape[0], chunk):
        sim = query_emb[start : start + chunk].float() @ key_emb.float().t()  # (c, N)
        pos = query_labels[start : start + chunk].unsqueeze(1) == key_labels.unsqueeze(0)  # (c, N)
        top = sim.topk(k, dim=1).indices  # (c, k)
        in_top = torch.zeros_like(pos).scatter_(1, top, True)
        best_pos_sim = torch.where(pos & ~in_top, sim, torch.full_like(sim, -torch.inf)).amax(
            dim=1, keepdim=True
        )
        cands.append(top)
        pos_in.append((pos & in_top).any(dim=1))
        fallback.append(k + (~in_top & (sim > best_pos_sim)).sum(dim=1))
    return _Prefiltered(torch.cat(cands), torch.cat(pos_in), torch.cat(fallback))


def _rerank_ranks(pre: _Prefiltered, itm: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Rank of the best positive after reranking the candidates by ITM (itm, positives: (Q, k))."""
    best = torch.where(positives, itm, torch.full_like(itm, -torch.inf)).amax(dim=1, keepdim=True)
    reranked = (itm > best).sum(dim=1)
    return torch.where(pre.positive_in_candidates, reranked, pre.fallback_rank)


def prefilter_rerank_retrieval(
    pair_score_fn: PairScoreFn,
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    image_of_text: torch.Tensor,
    k: int,
    ks: Sequence[int] = (1, 5, 10),
    batch_size: int = 256,
) -> RetrievalResult:
    """Two-stage retrieval: prefilter by embedding similarity, rerank the top-k with ITM, in both directions.

    image_emb (N_img, D), text_emb (N_txt, D): the prefilter embeddings (already computed; their cost is the
    caller's to time). Pairs that are candidates in both directions are scored once. With k ≥ N every pair
    is a candidate and the ranks equal `exhaustive_retrieval`'s.
    """
    n_img = image_emb.shape[0]
    _check_labels(n_img, image_of_text)
    n_txt = image_of_text.numel()
    if text_emb.shape[0] != n_txt:
        raise ValueError(f"text_emb has {text_emb.shape[0]} rows for {n_txt} captions")
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    t0 = time.perf_counter()
    img_labels = torch.arange(n_img)
    i2t = prefilter_topk(image_emb, text_emb, img_labels, image_of_text, k)
    t2i = prefilter_topk(text_emb, image_emb, image_of_text, img_labels, k)
    t_pre = time.perf_counter() - t0

    # Union of candidate pairs, keyed as image * N_txt + text, so each is scored once.
    i2t_keys = torch.arange(n_img).unsqueeze(1) * n_txt + i2t.candidates  # (N_img, k_i)
    t2i_keys = t2i.candidates * n_txt + torch.arange(n_txt).unsqueeze(1)  # (N_txt, k_t)
    unique, inverse = torch.cat([i2t_keys.flatten(), t2i_keys.flatten()]).unique(return_inverse=True)
    t0 = time.perf_counter()
    unique_scores = score_pairs(pair_score_fn, unique // n_txt, unique % n_txt, batch_size)
    t_itm = time.perf_counter() - t0
    scores = unique_scores[inverse]
    i2t_itm = scores[: i2t_keys.numel()].view_as(i2t_keys)
    t2i_itm = scores[i2t_keys.numel() :].view_as(t2i_keys)

    ranks = {
        "i2t": _rerank_ranks(i2t, i2t_itm, image_of_text[i2t.candidates] == img_labels.unsqueeze(1)),
        "t2i": _rerank_ranks(t2i, t2i_itm, t2i.candidates == image_of_text.unsqueeze(1)),
    }
    logger.debug("prefilter+rerank: k=%d, %d of %d pairs scored", k, unique.numel(), n_img * n_txt)
    return RetrievalResult(
        recalls={d: recall_at_k(r, ks) for d, r in ranks.items()},
        ranks=ranks,
        pairs_scored=int(unique.numel()),
        seconds={"prefilter": t_pre, "itm": t_itm},
    )
