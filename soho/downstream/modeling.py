"""Task models: SOHO backbone + a task head, each computing its loss when labels are given.

- ``SohoForPooledClassification``: an MLP over the pooled [CLS] output of the joint pass, for
  - ``task="vqa"``: answer vocabulary, binary cross-entropy against soft scores (multi-label);
  - ``task="snli_ve"``: image premise + hypothesis → entailment / neutral / contradiction (cross-entropy);
  - ``task="nlvr2"``: each image of a pair with the statement, the two pooled outputs joined → true/false.
- ``SohoForRetrieval``: the pre-training ITM head ranks pairs; a light contrastive projection of
  single-modality features (an image-only and a text-only pass through the same transformer) prefilters.

Every joint pass goes through ``SohoModel.fuse``. Build a task model with ``new_task_model(task, config,
...)``, or from a pre-training export with ``task_model_from_backbone(task, dir, ...)`` (the ``soho.*``
weights of a ``SohoForPretraining`` or ``SohoModel`` directory); ``save_pretrained`` writes ``config.json`` +
``model.safetensors`` with ``soho.serialization`` like the backbone (so ``SohoModel.from_pretrained`` also
reads a fine-tuned directory), and ``load_task_model(dir)`` loads any of them, those written by earlier
versions (``SohoForVQA`` / ``SohoForNLVR2`` / ``SohoForSNLIVE`` class tags) included.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from soho.config import SohoConfig
from soho.downstream.heads import ContrastiveProjection, MLPClassifier, info_nce_loss, vqa_bce_loss
from soho.heads import ITMHead
from soho.modeling import SohoModel, VisualTokens
from soho.serialization import read_model, save_model, sub_state

logger = logging.getLogger(__name__)

__all__ = [
    "TaskOutput",
    "TaskModel",
    "VisualTokens",
    "PooledTask",
    "POOLED_TASKS",
    "SohoForPooledClassification",
    "SohoForRetrieval",
    "RetrievalOutput",
    "TASK_MODELS",
    "new_task_model",
    "task_model_from_backbone",
    "load_task_model",
]


@dataclass
class TaskOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None


class TaskModel(nn.Module):
    """A SOHO backbone (``self.soho``) + a task head. Subclasses name their task (``self.task``) and the class
    tag and keyword arguments their saved directory records (``saved_class``, ``task_args``), and rebuild
    from those in ``from_task_args``."""

    task: str = ""

    def __init__(self, config: SohoConfig, load_pretrained: bool) -> None:
        super().__init__()
        self.config = config
        self.soho = SohoModel(config, load_pretrained=load_pretrained)

    @property
    def saved_class(self) -> str:
        return type(self).__name__

    def task_args(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_task_args(
        cls, config: SohoConfig, task: str, task_args: dict[str, Any], load_pretrained: bool = True
    ) -> TaskModel:
        """The model a saved directory describes (before its weights are loaded): by default
        ``cls(config, **task_args)``."""
        return cls(config, **task_args, load_pretrained=load_pretrained)

    def init_from_export(self, state: dict[str, torch.Tensor], directory: str | Path) -> None:
        """Hook of ``from_backbone``: take task weights from a pre-training export's state (default none)."""

    def save_pretrained(self, directory: str | Path) -> Path:
        return save_model(directory, self, self.config, self.saved_class, task=self.task,
                          task_args=self.task_args())

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> TaskModel:
        """A task model saved by ``save_pretrained`` (or by an earlier version), if it is one of this
        class."""
        return _load_task_model(directory, cls)

    @classmethod
    def from_backbone(cls, directory: str | Path, *args: Any, **kwargs: Any) -> TaskModel:
        """A fresh task head (``cls(config, *args, **kwargs)``) on the SOHO backbone of a pre-training export;
        the export's heads are dropped unless ``init_from_export`` takes them (retrieval: ITM + ITC)."""
        config, _, state = read_model(directory)
        # built before the head: seeded head inits stay as they were
        backbone = SohoModel.from_state(config, state)
        model = cls(backbone.config, *args, **kwargs, load_pretrained=False)
        model.soho.load_state_dict(backbone.state_dict(), strict=True)
        model.init_from_export(state, directory)
        return model


@dataclass(frozen=True)
class PooledTask:
    """What differs between the pooled-classification tasks."""

    name: str
    saved_class: str
    """The ``soho_class`` tag of its saved directories (the class name earlier versions had)."""
    labels_arg: str | None
    """Key of the label count in the saved ``task_args`` (None: fixed at ``default_labels``)."""
    default_labels: int | None
    loss: str
    """"bce": multi-label against soft scores (B, num_labels); "ce": one class id per row (B,)."""
    images_per_text: int
    """Images fused with each text; their pooled outputs are joined before the classifier."""


POOLED_TASKS: dict[str, PooledTask] = {
    "vqa": PooledTask("vqa", "SohoForVQA", "num_answers", None, "bce", 1),
    "snli_ve": PooledTask("snli_ve", "SohoForSNLIVE", "num_labels", 3, "ce", 1),
    "nlvr2": PooledTask("nlvr2", "SohoForNLVR2", None, 2, "ce", 2),
}


class SohoForPooledClassification(TaskModel):
    """MLP over the pooled [CLS] output(s) of the joint pass → ``num_labels`` logits (VQA, SNLI-VE, NLVR2).

    With ``images_per_text`` = k > 1 (NLVR2: k = 2), image rows (k·i … k·i+k−1) are fused each with text i and
    their pooled outputs joined (B, k·C) before the classifier."""

    def __init__(
        self, config: SohoConfig, task: str, num_labels: int | None = None, load_pretrained: bool = True
    ) -> None:
        if task not in POOLED_TASKS:
            raise ValueError(
                f"SohoForPooledClassification: task={task!r}, expected one of {sorted(POOLED_TASKS)}"
            )
        spec = POOLED_TASKS[task]
        if spec.labels_arg is None and num_labels not in (None, spec.default_labels):
            raise ValueError(f"task {task!r} has {spec.default_labels} labels, got num_labels={num_labels}")
        num_labels = spec.default_labels if num_labels is None else num_labels
        if num_labels is None:
            raise ValueError(f"task {task!r} needs num_labels (the answer vocabulary size)")
        super().__init__(config, load_pretrained)
        self.task, self.spec, self.num_labels = task, spec, num_labels
        self.head = MLPClassifier(spec.images_per_text * config.transformer.hidden_size, num_labels)

    @property
    def saved_class(self) -> str:
        return self.spec.saved_class

    def task_args(self) -> dict[str, Any]:
        return {} if self.spec.labels_arg is None else {self.spec.labels_arg: self.num_labels}

    @classmethod
    def from_task_args(
        cls, config: SohoConfig, task: str, task_args: dict[str, Any], load_pretrained: bool = True
    ) -> SohoForPooledClassification:
        labels_arg = POOLED_TASKS[task].labels_arg
        unknown = sorted(set(task_args) - {labels_arg})
        if unknown:
            raise ValueError(f"task {task!r}: unknown task_args {unknown}")
        num_labels = task_args.get(labels_arg) if labels_arg is not None else None
        return cls(config, task, num_labels, load_pretrained=load_pretrained)

    def forward(
        self,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> TaskOutput:
        """pixel_values (k·B, 3, H, W); input_ids (B, T); labels: (B, num_labels) soft scores for "bce"
        (VQA), (B,) class ids for "ce" (NLVR2: 1 = true). Logits (B, num_labels)."""
        b, k = input_ids.shape[0], self.spec.images_per_text
        if pixel_values.shape[0] != k * b:
            raise ValueError(
                f"{self.task}: needs {k} image(s) per text: {pixel_values.shape[0]} images, {b} texts"
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if k > 1:  # (k·B, T): text i beside each of its k images
            input_ids, attention_mask = (input_ids.repeat_interleave(k, 0),
                                         attention_mask.repeat_interleave(k, 0))
        pooled = self.soho(pixel_values, pixel_mask, input_ids, attention_mask).pooled  # (k·B, C)
        logits = self.head(pooled.reshape(b, -1))  # (B, k·C) → (B, num_labels)
        if labels is None:
            return TaskOutput(logits)
        if self.spec.loss == "bce":
            return TaskOutput(logits, vqa_bce_loss(logits, labels))
        return TaskOutput(logits, F.cross_entropy(logits.float(), labels))


@dataclass
class RetrievalOutput:
    loss: torch.Tensor
    itm_loss: torch.Tensor
    itc_loss: torch.Tensor
    itm_acc: torch.Tensor


class SohoForRetrieval(TaskModel):
    """Image-text retrieval: ITM score for ranking, contrastive projections for the prefilter.

    Training (`forward`) adds to the ITM loss an in-batch InfoNCE loss on the projections and mines the ITM
    negatives from the projections' similarity (one negative text per image and one negative image per
    text, sampled ∝ exp(similarity) with the caller's generator), so ITM learns the cases the prefilter
    confuses."""

    task = "retrieval"

    def __init__(self, config: SohoConfig, embed_dim: int = 256, load_pretrained: bool = True) -> None:
        super().__init__(config, load_pretrained)
        c = config.transformer.hidden_size
        self.embed_dim = embed_dim
        self.itm_head = ITMHead(c, interaction=config.pretrain.itm_interaction)
        self.projection = ContrastiveProjection(c, c, embed_dim)

    def task_args(self) -> dict[str, Any]:
        return {"embed_dim": self.embed_dim}

    def init_from_export(self, state: dict[str, torch.Tensor], directory: str | Path) -> None:
        """When the export has them: the pre-trained ITM head (``itm_head.*`` keys) and the pre-training ITC
        projection (``itc.*``, when ``pretrain.itc_weight`` > 0 and its width equals ``embed_dim``) as the
        prefilter's starting point."""
        itm = sub_state(state, "itm_head.")
        if itm:
            self.itm_head.load_state_dict(itm, strict=True)
        else:
            logger.warning("%s has no ITM head; retrieval starts from a random one", directory)
        itc = sub_state(state, "itc.")
        if itc and itc["image_proj.weight"].shape[0] == self.embed_dim:
            self.projection.load_state_dict(itc, strict=True)
        elif itc:
            logger.warning("%s: ITC width %d != embed_dim %d; the prefilter projection starts random",
                           directory, itc["image_proj.weight"].shape[0], self.embed_dim)

    # -- pieces -------------------------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None) -> VisualTokens:
        return self.soho.encode_visual(pixel_values, pixel_mask).visual

    def image_embedding(self, visual: VisualTokens) -> torch.Tensor:
        """Image-only pass (``SohoModel.image_only``) → projection (N, D)."""
        return self.projection.embed_image(self.soho.image_only(visual.tokens, visual.mask, visual.grid))

    def text_embedding(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Text-only pass (``SohoModel.text_only``) → projection (N, D)."""
        return self.projection.embed_text(self.soho.text_only(input_ids, attention_mask))

    def itm_score(
        self, visual: VisualTokens, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """(P,) match log-odds, logit[match] − logit[no match], for aligned rows of images and texts."""
        hidden, pooled = self.soho.fuse(input_ids, attention_mask, visual.tokens, visual.mask, visual.grid)
        logits = self.itm_head(pooled, hidden, attention_mask, visual.mask).float()
        return logits[:, 1] - logits[:, 0]

    # -- training -----------------------------------------------------------------------------------------
    def forward(
        self,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> RetrievalOutput:
        """Rows i of images and texts are matching pairs (distinct images within the batch)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        b = input_ids.shape[0]
        if b < 2:
            raise ValueError("retrieval training needs at least 2 pairs per batch (in-batch negatives)")
        visual = self.encode_images(pixel_values, pixel_mask)
        img_emb, txt_emb = self.image_embedding(visual), self.text_embedding(input_ids, attention_mask)
        itc_loss = info_nce_loss(img_emb, txt_emb, self.projection.logit_scale())

        with torch.no_grad():  # hard negatives ∝ exp(sim), never the positive itself
            sim = (img_emb @ txt_emb.t()).float() * self.projection.logit_scale().detach()
            sim.fill_diagonal_(-torch.inf)
            neg_text = torch.multinomial(sim.softmax(dim=1).cpu(), 1, generator=generator).flatten()
            neg_image = torch.multinomial(sim.t().softmax(dim=1).cpu(), 1, generator=generator).flatten()
        neg_text, neg_image = neg_text.to(input_ids.device), neg_image.to(input_ids.device)
        rows = torch.arange(b, device=input_ids.device)
        img_idx = torch.cat([rows, rows, neg_image])  # (3B,): positives, image→hard text, text→hard image
        txt_idx = torch.cat([rows, neg_text, rows])
        labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(input_ids.device)
        hidden, pooled = self.soho.fuse(
            input_ids[txt_idx],
            attention_mask[txt_idx],
            visual.tokens[img_idx],
            visual.mask[img_idx],
            visual.grid,
        )
        itm_logits = self.itm_head(pooled, hidden, attention_mask[txt_idx], visual.mask[img_idx]).float()
        # Weight positives ×2 so the classes count equally (B positives vs 2B negatives).
        itm_loss = F.cross_entropy(itm_logits, labels, weight=torch.tensor([1.0, 2.0], device=labels.device))
        itm_acc = (itm_logits.argmax(-1) == labels).float().mean().detach()
        return RetrievalOutput(itm_loss + itc_loss, itm_loss, itc_loss, itm_acc)


TASK_MODELS: dict[str, type[TaskModel]] = {
    **{task: SohoForPooledClassification for task in POOLED_TASKS},
    "retrieval": SohoForRetrieval,
}
"""Task name → its class (recorded as ``task`` in every saved task directory)."""


def new_task_model(task: str, config: SohoConfig, load_pretrained: bool = True, **kwargs: Any) -> TaskModel:
    """A fresh task model: ``num_labels`` for "vqa" (the answer vocabulary size; optional for "snli_ve" and
    "nlvr2"), ``embed_dim`` for "retrieval"."""
    if task in POOLED_TASKS:
        return SohoForPooledClassification(config, task, load_pretrained=load_pretrained, **kwargs)
    if task == "retrieval":
        return SohoForRetrieval(config, load_pretrained=load_pretrained, **kwargs)
    raise ValueError(f"unknown task {task!r}: expected one of {sorted(TASK_MODELS)}")


def task_model_from_backbone(task: str, directory: str | Path, **kwargs: Any) -> TaskModel:
    """``new_task_model``'s model on the SOHO backbone of the pre-training export in ``directory``."""
    if task in POOLED_TASKS:
        return SohoForPooledClassification.from_backbone(directory, task, **kwargs)
    if task == "retrieval":
        return SohoForRetrieval.from_backbone(directory, **kwargs)
    raise ValueError(f"unknown task {task!r}: expected one of {sorted(TASK_MODELS)}")


def load_task_model(directory: str | Path) -> TaskModel:
    """Any fine-tuned task model saved by ``save_pretrained``, dispatched on its recorded task."""
    return _load_task_model(directory, TaskModel)


def _load_task_model(directory: str | Path, expected: type[TaskModel]) -> TaskModel:
    config, meta, state = read_model(directory)
    task = meta.get("task")
    if task not in TASK_MODELS:
        raise ValueError(f"{directory}: not a fine-tuned SOHO task model (task={task!r})")
    if not issubclass(TASK_MODELS[task], expected):
        raise ValueError(f"{directory}: holds task {task!r}, not a {expected.__name__} task")
    model = TASK_MODELS[task].from_task_args(config, task, meta.get("task_args", {}), load_pretrained=False)
    model.load_state_dict(state, strict=True)
    return model
