"""Task models: SOHO backbone + a task head, each computing its loss when labels are given.

- ``SohoForVQA``: MLP over [CLS] → answer vocabulary, BCE with soft scores.
- ``SohoForNLVR2``: each image of the pair with the statement; the two [CLS] outputs joined → true/false.
- ``SohoForSNLIVE``: image premise + hypothesis → entailment / neutral / contradiction.
- ``SohoForRetrieval``: the pre-training ITM head ranks pairs; a light contrastive projection of
  single-modality features (an image-only and a text-only pass through the same transformer) prefilters.

All are built from a pre-training export with ``from_backbone(dir, ...)`` (the ``soho.*`` weights of a
``SohoForPretraining`` or ``SohoModel`` directory) and saved/loaded as ``config.json`` + ``model.safetensors``
like the backbone, so ``SohoModel.from_pretrained`` also reads a fine-tuned directory.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from soho.config import SohoConfig
from soho.downstream.heads import ContrastiveProjection, MLPClassifier, info_nce_loss, vqa_bce_loss
from soho.heads import ITMHead
from soho.modeling import SohoModel

logger = logging.getLogger(__name__)

__all__ = [
    "TaskOutput",
    "VisualTokens",
    "SohoForVQA",
    "SohoForNLVR2",
    "SohoForSNLIVE",
    "SohoForRetrieval",
    "RetrievalOutput",
    "TASK_MODELS",
    "load_task_model",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class TaskOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None


class _TaskModel(nn.Module):
    """Shared persistence: the SOHO config, the task's own arguments, fp32 safetensors (no pickle)."""

    task: str = ""

    def __init__(self, config: SohoConfig, load_pretrained: bool) -> None:
        super().__init__()
        self.config = config
        self.soho = SohoModel(config, load_pretrained=load_pretrained)

    def task_args(self) -> dict[str, Any]:
        return {}

    def save_pretrained(self, directory: str | Path) -> Path:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: (v.detach().cpu().float() if v.is_floating_point() else v.detach().cpu()).contiguous()
                   for k, v in self.state_dict().items()}  # fmt: skip
        save_file(
            tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt", "soho_class": type(self).__name__}
        )
        meta = {"soho_class": type(self).__name__, "task": self.task, "task_args": self.task_args(),
                "config": self.config.to_dict()}  # fmt: skip
        (out / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True))
        return out

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> _TaskModel:
        meta, state = _read_dir(directory)
        if meta.get("task") != cls.task:
            raise ValueError(f"{directory}: holds task {meta.get('task')!r}, not {cls.task!r}")
        model = cls(SohoConfig.from_dict(meta["config"]), **meta.get("task_args", {}), load_pretrained=False)
        model.load_state_dict(state, strict=True)
        return model

    @classmethod
    def from_backbone(cls, directory: str | Path, **task_args: Any) -> _TaskModel:
        """A fresh task head on the SOHO backbone of a pre-training export (heads of the export dropped,
        except the ITM head for retrieval, which `SohoForRetrieval` overrides)."""
        backbone = SohoModel.from_pretrained(directory)
        model = cls(backbone.config, **task_args, load_pretrained=False)
        model.soho.load_state_dict(backbone.state_dict(), strict=True)
        return model


def _read_dir(directory: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    d = Path(directory)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (d / name).is_file():
            raise FileNotFoundError(f"{directory}: missing {name}")
    meta = json.loads((d / CONFIG_NAME).read_text())
    if "config" not in meta:
        raise ValueError(f"{d / CONFIG_NAME}: not a SOHO config (no 'config' key)")
    return meta, load_file(str(d / WEIGHTS_NAME))


class SohoForVQA(_TaskModel):
    task = "vqa"

    def __init__(self, config: SohoConfig, num_answers: int, load_pretrained: bool = True) -> None:
        super().__init__(config, load_pretrained)
        self.num_answers = num_answers
        self.head = MLPClassifier(config.transformer.hidden_size, num_answers)

    def task_args(self) -> dict[str, Any]:
        return {"num_answers": self.num_answers}

    def forward(
        self,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        target_scores: torch.Tensor | None = None,
    ) -> TaskOutput:
        """target_scores (B, num_answers): soft VQA scores; logits (B, num_answers)."""
        logits = self.head(self.soho(pixel_values, pixel_mask, input_ids, attention_mask).pooled)
        loss = None if target_scores is None else vqa_bce_loss(logits, target_scores)
        return TaskOutput(logits, loss)


class SohoForNLVR2(_TaskModel):
    """NLVR2: images come in pairs, rows (2i, 2i+1) = (left, right) of statement i."""

    task = "nlvr2"

    def __init__(self, config: SohoConfig, load_pretrained: bool = True) -> None:
        super().__init__(config, load_pretrained)
        self.head = MLPClassifier(2 * config.transformer.hidden_size, 2)

    def forward(
        self,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> TaskOutput:
        """pixel_values (2B, 3, H, W); input_ids (B, T); labels (B,) 1 = true."""
        b = input_ids.shape[0]
        if pixel_values.shape[0] != 2 * b:
            raise ValueError(
                f"NLVR2 needs two images per statement: {pixel_values.shape[0]} images, {b} statements"
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        ids, am = input_ids.repeat_interleave(2, dim=0), attention_mask.repeat_interleave(2, dim=0)  # (2B, T)
        pooled = self.soho(pixel_values, pixel_mask, ids, am).pooled  # (2B, C)
        logits = self.head(pooled.reshape(b, -1))  # (B, 2C) → (B, 2)
        loss = None if labels is None else F.cross_entropy(logits.float(), labels)
        return TaskOutput(logits, loss)


class SohoForSNLIVE(_TaskModel):
    task = "snli_ve"

    def __init__(self, config: SohoConfig, num_labels: int = 3, load_pretrained: bool = True) -> None:
        super().__init__(config, load_pretrained)
        self.num_labels = num_labels
        self.head = MLPClassifier(config.transformer.hidden_size, num_labels)

    def task_args(self) -> dict[str, Any]:
        return {"num_labels": self.num_labels}

    def forward(
        self,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> TaskOutput:
        logits = self.head(self.soho(pixel_values, pixel_mask, input_ids, attention_mask).pooled)
        loss = None if labels is None else F.cross_entropy(logits.float(), labels)
        return TaskOutput(logits, loss)


@dataclass
class VisualTokens:
    """VD-quantized visual tokens of a set of images, reusable across many texts (retrieval caches them)."""

    tokens: torch.Tensor  # (N, L, C)
    mask: torch.Tensor  # (N, L) bool
    grid: tuple[int, int]

    def __getitem__(self, index: torch.Tensor | slice) -> VisualTokens:
        return VisualTokens(self.tokens[index], self.mask[index], self.grid)

    def regrid(self, grid: tuple[int, int]) -> VisualTokens:
        """Place the (h, w) token grid in the top-left of a larger (H, W) grid, the rest masked — the layout
        that padding the images bottom/right to a common size gives — so batches of different sizes concat."""
        (h, w), (hh, ww) = self.grid, grid
        if (h, w) == (hh, ww):
            return self
        if hh < h or ww < w:
            raise ValueError(f"cannot regrid {h}×{w} visual tokens into a smaller {hh}×{ww} grid")
        n, _, c = self.tokens.shape
        tokens = self.tokens.new_zeros(n, hh, ww, c)
        mask = self.mask.new_zeros(n, hh, ww)
        tokens[:, :h, :w] = self.tokens.view(n, h, w, c)
        mask[:, :h, :w] = self.mask.view(n, h, w)
        return VisualTokens(tokens.view(n, hh * ww, c), mask.view(n, hh * ww), (hh, ww))

    @staticmethod
    def cat(parts: list[VisualTokens]) -> VisualTokens:
        grid = (max(p.grid[0] for p in parts), max(p.grid[1] for p in parts))
        parts = [p.regrid(grid) for p in parts]
        return VisualTokens(torch.cat([p.tokens for p in parts]), torch.cat([p.mask for p in parts]), grid)


@dataclass
class RetrievalOutput:
    loss: torch.Tensor
    itm_loss: torch.Tensor
    itc_loss: torch.Tensor
    itm_acc: torch.Tensor


class SohoForRetrieval(_TaskModel):
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

    @classmethod
    def from_backbone(cls, directory: str | Path, **task_args: Any) -> SohoForRetrieval:
        """Backbone and, when the export has them, the pre-trained ITM head (``itm_head.*`` keys) and the
        pre-training ITC projection (``itc.*``, when ``pretrain.itc_weight`` > 0 and its width equals
        ``embed_dim``) as the prefilter's starting point."""
        model = super().from_backbone(directory, **task_args)
        _, state = _read_dir(directory)
        itm = {k[len("itm_head.") :]: v for k, v in state.items() if k.startswith("itm_head.")}
        if itm:
            model.itm_head.load_state_dict(itm, strict=True)
        else:
            logger.warning("%s has no ITM head; retrieval starts from a random one", directory)
        itc = {k[len("itc.") :]: v for k, v in state.items() if k.startswith("itc.")}
        if itc and itc["image_proj.weight"].shape[0] == model.embed_dim:
            model.projection.load_state_dict(itc, strict=True)
        elif itc:
            logger.warning("%s: ITC width %d != embed_dim %d; the prefilter projection starts random",
                           directory, itc["image_proj.weight"].shape[0], model.embed_dim)
        return model  # type: ignore[return-value]

    # -- pieces -------------------------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None) -> VisualTokens:
        features, mask, grid = self.soho.encode_image_grid(pixel_values, pixel_mask)
        vd = self.soho.visual_dictionary(features, mask)
        return VisualTokens(vd.quantized, mask, grid)

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


TASK_MODELS: dict[str, type[_TaskModel]] = {
    "vqa": SohoForVQA,
    "nlvr2": SohoForNLVR2,
    "snli_ve": SohoForSNLIVE,
    "retrieval": SohoForRetrieval,
}


def load_task_model(directory: str | Path) -> _TaskModel:
    """Any fine-tuned task model saved by `save_pretrained`, dispatched on its recorded task."""
    meta, _ = _read_dir(directory)
    task = meta.get("task")
    if task not in TASK_MODELS:
        raise ValueError(f"{directory}: not a fine-tuned SOHO task model (task={task!r})")
    return TASK_MODELS[task].from_pretrained(directory)
