"""Image-text retrieval evaluation, shared by both jobs: fine-tuned retrieval models (prefilter + ITM
re-rank, and exhaustive ITM ranking) and a pre-training model's ITM head on a held-out split.

Rank-agnostic functions over a model in eval mode; fine-tuning's retrieval task calls
:func:`evaluate_retrieval`, the pre-training loop calls :func:`pretraining_retrieval_eval` every N steps and
publishes the result with :func:`export_recall` as ``soho_eval_recall{direction, k}``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from data_pipeline.downstream import (
    RetrievalImage,
    TaskCollator,
    flatten_captions,
)
from soho.downstream.modeling import SohoForRetrieval, VisualTokens
from soho.downstream.retrieval import RetrievalResult, exhaustive_retrieval, prefilter_rerank_retrieval

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
