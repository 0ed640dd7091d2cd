"""Evaluation of fine-tuned task models (and of a pre-training model's ITM head) on task examples.

Rank-agnostic functions over a model in eval mode; `orchestration.finetune` calls them after (or during)
fine-tuning, `soho.evaluate` on a saved checkpoint, and the pre-training loop may call
`pretraining_retrieval_eval` every N steps on a held-out Karpathy-format split and export the result with
`export_recall` as ``soho_eval_recall{direction, k}``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from data_pipeline.downstream import (
    NLVR2Example,
    RetrievalImage,
    SNLIVEExample,
    TaskCollator,
    VQAExample,
    collate_nlvr2,
    collate_snli_ve,
    collate_vqa,
    flatten_captions,
)
from soho.downstream.metrics import accuracy, vqa_soft_accuracy
from soho.downstream.modeling import SohoForNLVR2, SohoForRetrieval, SohoForSNLIVE, SohoForVQA, VisualTokens
from soho.downstream.retrieval import RetrievalResult, exhaustive_retrieval, prefilter_rerank_retrieval
from soho.downstream.vqa import AnswerVocab

logger = logging.getLogger(__name__)


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _to(batch: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    out = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    if "pixel_values" in out:
        out["pixel_values"] = out["pixel_values"].to(dtype)
    return out


def _progress(it: Iterator[Any] | Sequence[Any], desc: str, enabled: bool, total: int | None = None) -> Any:
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, desc=desc, total=total, leave=False)


@torch.no_grad()
def evaluate_vqa(
    model: SohoForVQA,
    collator: TaskCollator,
    examples: list[VQAExample],
    vocab: AnswerVocab,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> dict[str, float]:
    """VQA soft accuracy (0..1) of the argmax answer against each question's human answers."""
    if any(not e.answers for e in examples):
        raise ValueError("evaluate_vqa needs annotated questions (the test split has no answers)")
    model.eval()
    preds: list[str] = []
    for chunk in _progress(list(_chunks(examples, batch_size)), "eval vqa", progress):
        b = _to(collate_vqa(collator, list(chunk)), torch.device(device), dtype)
        logits = model(b["pixel_values"], b["pixel_mask"], b["input_ids"], b["attention_mask"]).logits
        preds.extend(vocab.decode(logits.argmax(dim=-1).cpu()))
    return {
        "vqa_accuracy": vqa_soft_accuracy(preds, [e.answers for e in examples]),
        "num_examples": len(examples),
    }


@torch.no_grad()
def evaluate_classification(
    model: SohoForNLVR2 | SohoForSNLIVE,
    collator: TaskCollator,
    examples: list[NLVR2Example] | list[SNLIVEExample],
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> dict[str, float]:
    """Accuracy (0..1) for NLVR2 (true/false) or SNLI-VE (3-way)."""
    model.eval()
    nlvr2 = isinstance(model, SohoForNLVR2)
    collate: Callable[..., dict[str, Any]] = collate_nlvr2 if nlvr2 else collate_snli_ve
    logits, labels = [], []
    for chunk in _progress(list(_chunks(examples, batch_size)), "eval", progress):
        b = _to(collate(collator, list(chunk)), torch.device(device), dtype)
        logits.append(
            model(b["pixel_values"], b["pixel_mask"], b["input_ids"], b["attention_mask"]).logits.cpu()
        )
        labels.append(b["labels"].cpu())
    return {"accuracy": accuracy(torch.cat(logits), torch.cat(labels)), "num_examples": len(examples)}


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
    for chunk in _chunks(images, batch_size):
        b = _to(collator.images([im.image_path for im in chunk]), torch.device(device), dtype)
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
        for chunk in _chunks(images, batch_size):
            b = _to(collator.images([im.image_path for im in chunk]), torch.device(device), torch.float32)
            feats, mask, grid = soho.encode_image_grid(b["pixel_values"], b["pixel_mask"])
            parts.append(VisualTokens(soho.visual_dictionary(feats, mask).quantized, mask, grid))
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
    """Publish recall as ``soho_eval_recall{direction, k}`` (0..1) through `orchestration.runtime.metrics.SohoMetrics`."""
    if isinstance(result, RetrievalResult):
        values = {(d, k): v / 100.0 for d, rec in result.recalls.items() for k, v in rec.items()}
    else:  # the flat form {"i2t_r1": percent, ...}
        values = {}
        for key, v in result.items():
            d, _, k = key.partition("_r")
            if d in ("i2t", "t2i") and k.isdigit():
                values[(d, int(k))] = v / 100.0
    metrics.set_eval(values)
