"""The fine-tuning tasks as one registry: for each task, how to read its examples, collate a batch, build its
model (head), compute the training loss and evaluate. The training loop (:mod:`orchestration.finetune.worker`)
only ever looks a task up in :data:`TASKS`; adding a task is adding one :class:`Task` here.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from data_pipeline.downstream import (
    NLVR2Example,
    SNLIVEExample,
    TaskCollator,
    VQAExample,
    collate_nlvr2,
    collate_retrieval_pairs,
    collate_snli_ve,
    collate_vqa,
    read_karpathy,
    read_nlvr2,
    read_snli_ve,
    read_vqa,
)
from orchestration.finetune.config import FinetuneConfig
from orchestration.finetune.standard_metrics import retrieval_summary, vqa_official_accuracy
from orchestration.runtime.evaluation import batch_to, chunks, evaluate_retrieval, progress_bar
from soho import get_preset
from soho.downstream.metrics import accuracy, vqa_soft_accuracy
from soho.downstream.modeling import new_task_model, task_model_from_backbone
from soho.downstream.vqa import AnswerVocab

Stats = dict[str, float]


@dataclass(frozen=True)
class Task:
    """One downstream task. ``read(cfg, split)``: its examples ("train" | "eval"; VQA also "predict", the
    unlabelled ``--predict-split``); ``collate(collator,
    examples, seed, epoch)``: a training batch; ``loss(model, batch, vocab, generator)``: (loss, stats);
    ``evaluate(cfg, model, collator, examples, vocab, device, dtype)``: its figures; ``model_args(vocab)``:
    keyword arguments of its model (``soho.downstream.modeling.new_task_model(name, ...)``)."""

    name: str
    read: Callable[[FinetuneConfig, str], list[Any]]
    collate: Callable[[TaskCollator, list[Any], int, int], dict[str, Any]]
    loss: Callable[[Any, dict[str, Any], AnswerVocab | None, torch.Generator], tuple[torch.Tensor, Stats]]
    evaluate: Callable[..., dict[str, Any]]
    model_args: Callable[[AnswerVocab | None], dict[str, Any]] = lambda vocab: {}
    needs_vocab: bool = False


# --- reading ------------------------------------------------------------------------------------------
def _need(value: str | None, flag: str) -> str:
    if value is None:
        raise ValueError(f"{flag} is required when --data is not given")
    return value


def _images(cfg: FinetuneConfig) -> str:
    return _need(cfg.image_dir or (f"{cfg.data}/images" if cfg.data else None), "--image-dir")


def _explicit(cfg: FinetuneConfig, split: str) -> str | None:
    explicit = cfg.train_file if split == "train" else cfg.eval_file
    if explicit is None and cfg.data is None:
        raise ValueError(f"no data for {cfg.task} {split}: give --data or --{split}-file")
    return explicit


def _read_vqa(cfg: FinetuneConfig, split: str) -> list[VQAExample]:
    if split == "predict":  # the unlabelled --predict-split: questions only
        questions = cfg.predict_file or (
            f"{cfg.data}/vqa/{cfg.predict_split}_questions.json" if cfg.data else None)
        return read_vqa(_need(questions, "--predict-file"), _images(cfg))
    explicit, root = _explicit(cfg, split), cfg.data
    name = "train" if split == "train" else "val"
    annotations = (cfg.train_annotations if split == "train" else cfg.eval_annotations) or (
        f"{root}/vqa/{name}_annotations.json" if root else None)
    return read_vqa(explicit or f"{root}/vqa/{name}_questions.json", _images(cfg), annotations)


def _jsonl_reader(folder: str,
                  read: Callable[[str, str], list[Any]]) -> Callable[[FinetuneConfig, str], list[Any]]:
    def reader(cfg: FinetuneConfig, split: str) -> list[Any]:
        explicit = _explicit(cfg, split)
        return read(explicit or f"{cfg.data}/{folder}/{'train' if split == 'train' else 'dev'}.jsonl",
                    _images(cfg))
    return reader


def _first_json(directory: str) -> str:
    found = sorted(Path(directory).glob("dataset_*.json"))
    if not found:
        raise FileNotFoundError(f"no Karpathy split file dataset_*.json in {directory}")
    return str(found[0])


def _read_retrieval(cfg: FinetuneConfig, split: str) -> list[Any]:
    karpathy = _explicit(cfg, split) or _first_json(f"{cfg.data}/retrieval")
    splits = tuple(cfg.train_split.split(",")) if split == "train" else cfg.eval_split
    # Karpathy entries carry their folder ("filepath"), so images resolve under the dataset root.
    return read_karpathy(karpathy, cfg.image_dir or _need(cfg.data, "--image-dir"), splits)


# --- batches and losses -------------------------------------------------------------------------------
def _inputs(batch: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    return batch["pixel_values"], batch["pixel_mask"], batch["input_ids"], batch["attention_mask"]


def _collate_retrieval(collator: TaskCollator, chunk: list[Any], seed: int, epoch: int) -> dict[str, Any]:
    # one caption per image, drawn by (seed, epoch, image) so every caption is used over epochs
    choice = [random.Random(f"{seed}/{epoch}/{im.image_id}").randrange(1 << 30) for im in chunk]
    return collate_retrieval_pairs(collator, chunk, choice)


def _vqa_loss(model: Any, batch: dict[str, Any], vocab: AnswerVocab | None,
              generator: torch.Generator) -> tuple[torch.Tensor, Stats]:
    assert vocab is not None
    target = torch.stack([vocab.target_scores(a) for a in batch["answers"]]).to(batch["input_ids"].device)
    out = model(*_inputs(batch), labels=target)
    return out.loss, {"loss": out.loss.item()}


def _classification_loss(model: Any, batch: dict[str, Any], vocab: AnswerVocab | None,
                         generator: torch.Generator) -> tuple[torch.Tensor, Stats]:
    labels = batch["labels"]
    out = model(*_inputs(batch), labels=labels)
    acc = (out.logits.argmax(-1) == labels).float().mean().item()
    return out.loss, {"loss": out.loss.item(), "acc": acc}


def _retrieval_loss(model: Any, batch: dict[str, Any], vocab: AnswerVocab | None,
                    generator: torch.Generator) -> tuple[torch.Tensor, Stats]:
    out = model(*_inputs(batch), generator=generator)
    return out.loss, {"loss": out.loss.item(), "itm": out.itm_loss.item(), "itc": out.itc_loss.item(),
                      "itm_acc": out.itm_acc.item()}


# --- evaluation ---------------------------------------------------------------------------------------
@torch.no_grad()
def predict_vqa(
    model: torch.nn.Module,
    collator: TaskCollator,
    examples: list[VQAExample],
    vocab: AnswerVocab,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> list[str]:
    """The argmax answer of every question (its answers are not needed: test splits have none)."""
    model.eval()
    preds: list[str] = []
    for chunk in progress_bar(list(chunks(examples, batch_size)), "predict vqa", progress):
        b = batch_to(collate_vqa(collator, list(chunk)), torch.device(device), dtype)
        logits = model(b["pixel_values"], b["pixel_mask"], b["input_ids"], b["attention_mask"]).logits
        preds.extend(vocab.decode(logits.argmax(dim=-1).cpu()))
    return preds


def evaluate_vqa(
    model: torch.nn.Module,
    collator: TaskCollator,
    examples: list[VQAExample],
    vocab: AnswerVocab,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> dict[str, Any]:
    """VQA soft accuracy (ours, 0..1: both sides normalised alike) of the argmax answer against each
    question's human answers, and the evaluation server's figure next to it: ``overall`` (percent) and
    ``perAnswerType`` (:func:`orchestration.finetune.standard_metrics.vqa_official_accuracy`)."""
    if any(not e.answers for e in examples):
        raise ValueError("evaluate_vqa needs annotated questions (the test split has no answers: "
                         "use --predict-split to write its result file)")
    preds = predict_vqa(model, collator, examples, vocab, batch_size, device, dtype, progress)
    humans = [e.answers for e in examples]
    official = vqa_official_accuracy(preds, humans, [e.answer_type for e in examples])
    return {"vqa_accuracy": vqa_soft_accuracy(preds, humans), **official, "num_examples": len(examples)}


def vqa_result_file(examples: list[VQAExample], answers: list[str]) -> list[dict[str, Any]]:
    """The evaluation server's submission format: ``[{"question_id": int, "answer": str}, ...]``, one entry
    per question, in the questions file's order."""
    if len(examples) != len(answers):
        raise ValueError(f"{len(answers)} answers for {len(examples)} questions")
    seen: set[int] = set()
    out = []
    for e, a in zip(examples, answers, strict=True):
        if e.question_id in seen:
            raise ValueError(f"question_id {e.question_id} appears twice in the questions file")
        seen.add(e.question_id)
        out.append({"question_id": int(e.question_id), "answer": str(a)})
    return out


@torch.no_grad()
def evaluate_classification(
    model: torch.nn.Module,
    collator: TaskCollator,
    examples: list[NLVR2Example] | list[SNLIVEExample],
    collate: Callable[[TaskCollator, list[Any]], dict[str, Any]],
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> dict[str, float]:
    """Accuracy (0..1) for NLVR2 (true/false) or SNLI-VE (3-way)."""
    model.eval()
    logits, labels = [], []
    for chunk in progress_bar(list(chunks(examples, batch_size)), "eval", progress):
        b = batch_to(collate(collator, list(chunk)), torch.device(device), dtype)
        logits.append(
            model(b["pixel_values"], b["pixel_mask"], b["input_ids"], b["attention_mask"]).logits.cpu()
        )
        labels.append(b["labels"].cpu())
    return {"accuracy": accuracy(torch.cat(logits), torch.cat(labels)), "num_examples": len(examples)}




def _eval_kwargs(cfg: FinetuneConfig, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    return {"batch_size": cfg.eval_batch_size, "device": device, "dtype": dtype}


def _evaluate_vqa(cfg: FinetuneConfig, model: Any, collator: TaskCollator, examples: list[Any],
                  vocab: AnswerVocab | None, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    assert vocab is not None
    return evaluate_vqa(model, collator, examples, vocab, progress=cfg.progress,
                        **_eval_kwargs(cfg, device, dtype))


def _evaluate_classification(cfg: FinetuneConfig, model: Any, collator: TaskCollator, examples: list[Any],
                             vocab: AnswerVocab | None, device: torch.device,
                             dtype: torch.dtype) -> dict[str, Any]:
    collate = collate_nlvr2 if cfg.task == "nlvr2" else collate_snli_ve
    return evaluate_classification(model, collator, examples, collate, progress=cfg.progress,
                                   **_eval_kwargs(cfg, device, dtype))


def _evaluate_retrieval(cfg: FinetuneConfig, model: Any, collator: TaskCollator, examples: list[Any],
                        vocab: AnswerVocab | None, device: torch.device,
                        dtype: torch.dtype) -> dict[str, Any]:
    out = evaluate_retrieval(model, collator, examples, k=cfg.retrieval_k,
                             exhaustive=cfg.retrieval_exhaustive, **_eval_kwargs(cfg, device, dtype))
    return with_retrieval_summary(out)


def with_retrieval_summary(out: dict[str, Any]) -> dict[str, Any]:
    """The papers' r_mean / RSUM beside each ranking's six recalls, and at the top level for the headline
    ranking (exhaustive ITM when it ran, else the fast path)."""
    for name in ("fast", "exhaustive"):
        if name in out:
            out[name].update(retrieval_summary(out[name]))
    headline = out.get("exhaustive", out["fast"])
    out.update({"r_mean": headline["r_mean"], "rsum": headline["rsum"]})
    return out


# --- the registry -------------------------------------------------------------------------------------
TASKS: dict[str, Task] = {
    "vqa": Task("vqa", _read_vqa, lambda c, chunk, seed, epoch: collate_vqa(c, chunk), _vqa_loss,
                _evaluate_vqa,
                model_args=lambda vocab: {"num_labels": len(vocab)} if vocab is not None else {},
                needs_vocab=True),
    "nlvr2": Task("nlvr2", _jsonl_reader("nlvr2", read_nlvr2),
                  lambda c, chunk, seed, epoch: collate_nlvr2(c, chunk), _classification_loss,
                  _evaluate_classification),
    "snli_ve": Task("snli_ve", _jsonl_reader("snli_ve", read_snli_ve),
                    lambda c, chunk, seed, epoch: collate_snli_ve(c, chunk), _classification_loss,
                    _evaluate_classification),
    "retrieval": Task("retrieval", _read_retrieval, _collate_retrieval, _retrieval_loss, _evaluate_retrieval),
}


def build_task_model(cfg: FinetuneConfig, vocab: AnswerVocab | None) -> torch.nn.Module:
    """The task's model: its head on the pre-training export ``--init`` (or from scratch with ``--preset``);
    the same seed on every rank gives every rank the same head."""
    args = TASKS[cfg.task].model_args(vocab)
    torch.manual_seed(cfg.seed)
    if cfg.init:
        return task_model_from_backbone(cfg.task, cfg.init, **args)
    return new_task_model(cfg.task, get_preset(cfg.preset), **args)
