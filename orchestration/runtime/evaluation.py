"""Image-text retrieval evaluation, shared by both jobs: fine-tuned retrieval models (prefilter + ITM
re-rank, and exhaustive ITM ranking) and a pre-training model's ITM head on a held-out split.

Rank-agnostic functions over a model in eval mode; fine-tuning's retrieval task calls
:func:`evaluate_retrieval`, the pre-training loop calls :func:`pretraining_retrieval_eval` (the synthetic
held-out split) or :func:`pretraining_eval` (a Karpathy-format split: ITM accuracy + prefilter/re-rank or
exhaustive retrieval) every N steps and publishes the result with :func:`export_recall` as
``soho_eval_recall{direction, k}``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from data_pipeline.downstream import (
    RetrievalImage,
    TaskCollator,
    flatten_captions,
)
from soho.downstream.modeling import SohoForRetrieval, VisualTokens
from soho.downstream.retrieval import (
    RetrievalResult,
    exhaustive_retrieval,
    prefilter_rerank_retrieval,
    score_pairs,
)

logger = logging.getLogger(__name__)


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def batch_to(batch: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    out = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    if "pixel_values" in out and out["pixel_values"].is_floating_point():  # uint8: the encoder normalises
        out["pixel_values"] = out["pixel_values"].to(dtype)
    return out


def progress_bar(it: Iterator[Any] | Sequence[Any], desc: str, enabled: bool,
                 total: int | None = None) -> Any:
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, desc=desc, total=total, leave=False)


@torch.no_grad()
def encode_retrieval_set(
    model: SohoForRetrieval,
    collator: TaskCollator,
    images: list[RetrievalImage],
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    max_captions: int | None = None,
) -> tuple[VisualTokens, dict[str, torch.Tensor], torch.Tensor]:
    """Visual tokens of every image (encoded once), every caption tokenized with one common padding (so a
    pair's score does not depend on which batch it is scored in), and the image index of each caption."""
    model.eval()
    parts = []
    for chunk in chunks(images, batch_size):
        b = batch_to(collator.images([im.image_path for im in chunk]), torch.device(device), dtype)
        parts.append(model.encode_images(b["pixel_values"], b["pixel_mask"]))
    visual = VisualTokens.cat(parts)
    texts, owner = flatten_captions(images, max_captions)
    text = {k: v.to(device) for k, v in collator.texts(texts).items()}
    return visual, text, torch.tensor(owner, dtype=torch.long)


@torch.no_grad()
def evaluate_retrieval(
    model: SohoForRetrieval,
    collator: TaskCollator,
    images: list[RetrievalImage],
    k: int = 16,
    exhaustive: bool = True,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    max_captions: int | None = None,
) -> dict[str, Any]:
    """Prefilter+rerank recall@1/5/10 (and exhaustive ITM ranking when `exhaustive`), with timings."""
    t0 = time.perf_counter()
    visual, text, owner = encode_retrieval_set(
        model, collator, images, batch_size, device, dtype, max_captions
    )
    t_encode = time.perf_counter() - t0
    ids, am = text["input_ids"], text["attention_mask"]

    def score(img_idx: torch.Tensor, txt_idx: torch.Tensor) -> torch.Tensor:
        img_idx, txt_idx = img_idx.to(ids.device), txt_idx.to(ids.device)
        return model.itm_score(visual[img_idx], ids[txt_idx], am[txt_idx])

    t0 = time.perf_counter()
    img_emb = torch.cat(
        [model.image_embedding(visual[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    )
    txt_emb = torch.cat(
        [
            model.text_embedding(ids[i : i + batch_size], am[i : i + batch_size])
            for i in range(0, len(owner), batch_size)
        ]
    )
    t_embed = time.perf_counter() - t0
    fast = prefilter_rerank_retrieval(
        score, img_emb.float().cpu(), txt_emb.float().cpu(), owner, k, batch_size=batch_size
    )
    out: dict[str, Any] = {
        "num_images": len(images),
        "num_texts": int(owner.numel()),
        "k": k,
        "fast": {
            **fast.flat(),
            "pairs_scored": fast.pairs_scored,
            "seconds": t_encode + t_embed + sum(fast.seconds.values()),
        },  # fmt: skip
    }
    if exhaustive:
        full, _ = exhaustive_retrieval(score, owner, len(images), batch_size=batch_size)
        out["exhaustive"] = {**full.flat(), "pairs_scored": full.pairs_scored,
                             "seconds": t_encode + sum(full.seconds.values())}  # fmt: skip
    return out


@torch.no_grad()
def pretraining_retrieval_eval(
    model: Any,
    collator: TaskCollator,
    images: list[RetrievalImage],
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    ks: Sequence[int] = (1, 5, 10),
) -> RetrievalResult:
    """Exhaustive ITM retrieval with a `SohoForPretraining` (its ITM head; no prefilter projection exists
    yet during pre-training) on a small held-out split; meant to run every N steps."""
    was_training = model.training
    model.eval()
    try:
        soho = model.soho
        parts = []
        for chunk in chunks(images, batch_size):
            b = batch_to(collator.images([im.image_path for im in chunk]), torch.device(device),
                         torch.float32)
            parts.append(soho.encode_visual(b["pixel_values"], b["pixel_mask"]).visual)
        visual = VisualTokens.cat(parts)
        texts, owner = flatten_captions(images, 1)
        text = {k: v.to(device) for k, v in collator.texts(texts).items()}

        def score(img_idx: torch.Tensor, txt_idx: torch.Tensor) -> torch.Tensor:
            v = visual[img_idx.to(device)]
            ids, am = text["input_ids"][txt_idx], text["attention_mask"][txt_idx]
            hidden, pooled = soho.fuse(ids, am, v.tokens, v.mask, v.grid)
            logits = model.itm_head(pooled, hidden, am, v.mask).float()
            return logits[:, 1] - logits[:, 0]

        result, _ = exhaustive_retrieval(score, torch.tensor(owner), len(images), ks, batch_size)
        return result
    finally:
        model.train(was_training)


def derangement(n: int, seed: int) -> torch.Tensor:
    """Partner j ≠ i for every i (a fixed, seeded choice of another image's caption: the ITM negatives)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.arange(n) + torch.randint(1, n, (n,), generator=g)) % n


def _itc_embeddings(model: Any, visual: VisualTokens, ids: torch.Tensor, am: torch.Tensor,
                    batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised ITC embeddings (fp32, CPU) of every image (image-only pass) and caption (text-only pass)."""
    soho, itc = model.soho, model.itc
    images, texts = [], []
    for i in range(0, len(visual.tokens), batch_size):
        v = visual[i : i + batch_size]
        images.append(itc.embed_image(soho.image_only(v.tokens, v.mask, v.grid)).float().cpu())
    for i in range(0, ids.shape[0], batch_size):
        sl = slice(i, i + batch_size)
        texts.append(itc.embed_text(soho.text_only(ids[sl], am[sl])).float().cpu())
    return torch.cat(images), torch.cat(texts)


@torch.no_grad()
def pretraining_eval(
    model: Any,
    collator: TaskCollator,
    images: list[RetrievalImage],
    k: int = 16,
    exhaustive: bool = False,
    max_captions: int | None = 5,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    ks: Sequence[int] = (1, 5, 10),
    seed: int = 0,
) -> dict[str, Any]:
    """Held-out ITM accuracy and zero-shot retrieval of a ``SohoForPretraining`` on a retrieval pool (e.g.
    a Karpathy split: several captions per image, the first ``max_captions`` kept as in the 5k/1k protocol).

    Every image is encoded once (grid encoder + VD lookup, eval mode: the codebook does not move) and every
    caption tokenized with one common padding; a pair's ITM score is logit(match) - logit(no match).

    * ITM accuracy: each image with its first caption (label 1) and with the first caption of another image
      (label 0, :func:`derangement` of ``seed``), 2·N predictions (score > 0 means "match"); chance 50 %.
    * Retrieval, recall@``ks`` both ways: ``exhaustive`` ranks all N_img × N_txt pairs by ITM; otherwise the
      fast path ranks by the model's ITC embeddings (image-only and text-only passes, ``pretrain.itc_weight``
      > 0) and re-ranks each query's top ``k`` with ITM (:func:`prefilter_rerank_retrieval`).

    Returns ``result`` (a ``RetrievalResult``, percent), ``itm_acc``/``itm_acc_pos``/``itm_acc_neg`` (0..1),
    ``num_images``, ``num_texts``, ``pairs_scored`` (ITM passes), ``mode`` and ``seconds``."""
    if len(images) < 2:
        raise ValueError(f"pretraining_eval needs >= 2 images (an ITM negative is another image's), got "
                         f"{len(images)}")
    if not exhaustive and getattr(model, "itc", None) is None:
        raise ValueError("pretraining_eval: the prefilter needs the ITC projection (pretrain.itc_weight "
                         "> 0); use exhaustive=True")
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        soho = model.soho
        dev = torch.device(device)
        parts = []
        for chunk in chunks(images, batch_size):
            b = batch_to(collator.images([im.image_path for im in chunk]), dev, torch.float32)
            parts.append(soho.encode_visual(b["pixel_values"], b["pixel_mask"]).visual)
        visual = VisualTokens.cat(parts)
        texts, owner_list = flatten_captions(images, max_captions)
        owner = torch.tensor(owner_list, dtype=torch.long)
        text = {k_: v.to(dev) for k_, v in collator.texts(texts).items()}
        ids, am = text["input_ids"], text["attention_mask"]

        def score(img_idx: torch.Tensor, txt_idx: torch.Tensor) -> torch.Tensor:
            v = visual[img_idx.to(dev)]
            t_ids, t_am = ids[txt_idx.to(dev)], am[txt_idx.to(dev)]
            hidden, pooled = soho.fuse(t_ids, t_am, v.tokens, v.mask, v.grid)
            logits = model.itm_head(pooled, hidden, t_am, v.mask).float()
            return logits[:, 1] - logits[:, 0]

        n = len(images)
        first = torch.full((n,), -1, dtype=torch.long)
        for t in range(owner.numel() - 1, -1, -1):
            first[owner[t]] = t
        rows = torch.arange(n)
        partner = derangement(n, seed)
        pos = score_pairs(score, rows, first, batch_size)
        neg = score_pairs(score, rows, first[partner], batch_size)
        itm_pos, itm_neg = (pos > 0).float().mean().item(), (neg <= 0).float().mean().item()
        if exhaustive:
            result, _ = exhaustive_retrieval(score, owner, n, ks, batch_size)
        else:
            img_emb, txt_emb = _itc_embeddings(model, visual, ids, am, batch_size)
            result = prefilter_rerank_retrieval(score, img_emb, txt_emb, owner, k, ks, batch_size)
    finally:
        model.train(was_training)
    return {
        "result": result,
        "itm_acc": (itm_pos + itm_neg) / 2.0,
        "itm_acc_pos": itm_pos,
        "itm_acc_neg": itm_neg,
        "num_images": n,
        "num_texts": int(owner.numel()),
        "pairs_scored": result.pairs_scored + 2 * n,
        "mode": "exhaustive" if exhaustive else f"prefilter-k{k}",
        "seconds": time.perf_counter() - t0,
    }


def export_recall(metrics: Any, result: RetrievalResult | dict[str, float]) -> None:
    """Publish recall as ``soho_eval_recall{direction, k}`` (0..1) through
    `orchestration.runtime.metrics.SohoMetrics`."""
    if isinstance(result, RetrievalResult):
        values = {(d, k): v / 100.0 for d, rec in result.recalls.items() for k, v in rec.items()}
    else:  # the flat form {"i2t_r1": percent, ...}
        values = {}
        for key, v in result.items():
            d, _, k = key.partition("_r")
            if d in ("i2t", "t2i") and k.isdigit():
                values[(d, int(k))] = v / 100.0
    metrics.set_eval(values)


def print_result(result: dict[str, Any], out: Path | None = None) -> None:
    """An offline evaluation CLI's output: the figures as indented JSON on stdout, and in ``out`` if given."""
    text = json.dumps(result, indent=1)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    print(text, flush=True)
