"""SohoModel (encoder E → VD → cross-modal transformer) and SohoForPretraining (MLM + MVM + ITM (+ ITC)).

``SohoModel.fuse`` is the one fusion entry (the joint [text; visual] sequence and mask are built there only).
Persistence goes through ``soho.serialization``: ``save_pretrained(dir)`` writes ``config.json`` (the
SohoConfig as a dict) and ``model.safetensors`` (fp32 state dict); ``from_pretrained(dir)`` rebuilds from the
config without touching any hub or pretrained file and loads the tensors with safetensors (no pickle).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from soho.config import SohoConfig
from soho.encoder import GridEncoder
from soho.heads import ContrastiveProjection, ITMHead, MLMHead, MVMHead, info_nce_loss, masked_mean
from soho.masking import mask_tokens, mask_visual, sample_itm_pairs
from soho.serialization import FORMAT_VERSION, read_model, save_model, sub_state
from soho.transformer import CrossModalEncoder
from soho.visual_dictionary import VDOutput, VisualDictionary

logger = logging.getLogger(__name__)


@dataclass
class SohoModelOutput:
    last_hidden_state: torch.Tensor
    """(B, T+L, C): text positions first, then visual tokens."""
    pooled: torch.Tensor
    """(B, C): BERT pooler (dense + tanh) over the [CLS] output."""
    text_len: int
    """T: the first T positions of ``last_hidden_state`` are text."""
    visual_mask: torch.Tensor
    """(B, L) bool: True on real (unpadded) visual tokens."""
    vd: VDOutput
    grid: tuple[int, int]
    """(h, w) of the visual token grid, L = h·w (row-major)."""


@dataclass
class PretrainOutput:
    loss: torch.Tensor
    """mlm_loss + mvm_loss + itm_loss (equal weights) + pretrain.itc_weight · itc_loss."""
    mlm_loss: torch.Tensor
    mvm_loss: torch.Tensor
    itm_loss: torch.Tensor
    mlm_acc: torch.Tensor
    mvm_acc: torch.Tensor
    itm_acc: torch.Tensor
    """Detached float accuracies; 0 when a task had no positions in the batch (see *_count)."""
    mlm_count: torch.Tensor
    mvm_count: torch.Tensor
    itm_labels: torch.Tensor
    """(B,) 1 = matched pair, 0 = caption swapped."""
    itc_loss: torch.Tensor
    """InfoNCE of the optional ITC term (0 when ``pretrain.itc_weight`` is 0; unweighted)."""
    itc_acc: torch.Tensor
    """In-batch image→text top-1 accuracy of the ITC similarities (0 when off)."""


@dataclass
class VisualTokens:
    """VD-quantized visual tokens of a set of images, what ``SohoModel.fuse`` takes as its visual side;
    reusable across many texts (retrieval caches them)."""

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
class EncodedImages:
    """``SohoModel.encode_visual``: the grid features, their VD lookup and the tokens the transformer sees."""

    features: torch.Tensor
    """(B, L, C) grid features V before the VD."""
    vd: VDOutput
    visual: VisualTokens
    """(vd.quantized, visual mask (B, L) bool, grid (h, w))."""


class SohoModel(nn.Module):
    """Image + text → joint hidden states. ``load_pretrained`` fetches the ResNet/BERT weights named in the
    config (False when restoring a saved model, so nothing is read besides the checkpoint).

    ``fuse`` is the one fusion entry: every joint pass (pre-training, ITM scoring, every task model, the
    single-modality passes) goes through it, and it is the only place that joins the text and visual
    embeddings and their masks."""

    def __init__(self, config: SohoConfig, load_pretrained: bool = True) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.encoder = GridEncoder(config.encoder, load_pretrained=load_pretrained)
        self.visual_dictionary = VisualDictionary(config.vd)
        self.transformer = CrossModalEncoder(config.transformer, load_pretrained=load_pretrained)

    # -- pieces -------------------------------------------------------------------------------------------
    def encode_image_grid(
        self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        return self.encoder(pixel_values, pixel_mask)

    def encode_image(
        self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Grid features V before the VD (B, L, C) and the visual-token mask (B, L) bool."""
        features, mask, _ = self.encoder(pixel_values, pixel_mask)
        return features, mask

    def encode_visual(
        self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None
    ) -> EncodedImages:
        """Grid encoder → VD (updates the codebook in training mode): the visual side of a joint pass."""
        features, mask, grid = self.encoder(pixel_values, pixel_mask)  # (B, L, C), (B, L)
        vd = self.visual_dictionary(features, mask)
        return EncodedImages(features, vd, VisualTokens(vd.quantized, mask, grid))

    def fuse(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        visual_tokens: torch.Tensor,
        visual_mask: torch.Tensor,
        grid: tuple[int, int],
        masked_visual: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-modal transformer over [text | visual]; returns (hidden (B, T+L, C), pooled (B, C)).

        input_ids/attention_mask (B, T) (None = no text padding); visual_tokens (B, L, C); visual_mask (B, L)
        bool; masked_visual (B, L) bool positions replaced by the MVM mask embedding."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        n_text, n_vis = input_ids.shape[0], visual_tokens.shape[0]
        if n_text != n_vis:
            raise ValueError(
                f"fuse: input_ids has {n_text} rows but visual_tokens has {n_vis} (one image per text)"
            )
        if attention_mask.shape != input_ids.shape or visual_mask.shape != visual_tokens.shape[:2]:
            raise ValueError(
                f"fuse: attention_mask {tuple(attention_mask.shape)} must match input_ids "
                f"{tuple(input_ids.shape)} and visual_mask {tuple(visual_mask.shape)} visual_tokens "
                f"{tuple(visual_tokens.shape[:2])}"
            )
        text = self.transformer.embed_text(input_ids)  # (B, T, C)
        vis = self.transformer.embed_visual(visual_tokens, grid, masked_visual).to(text.dtype)  # (B, L, C)
        joint = torch.cat([text, vis], dim=1)  # (B, T+L, C)
        keep = torch.cat([attention_mask.to(torch.bool), visual_mask.to(torch.bool)], dim=1)  # (B, T+L)
        return self.transformer(joint, keep)

    def image_only(
        self, visual_tokens: torch.Tensor, visual_mask: torch.Tensor, grid: tuple[int, int]
    ) -> torch.Tensor:
        """Single-modality image pass ([CLS] [SEP] + visual tokens, no caption) → mean visual output
        (B, C)."""
        n, cfg = visual_tokens.shape[0], self.config.transformer
        ids = torch.tensor([[cfg.cls_token_id, cfg.sep_token_id]], device=visual_tokens.device).expand(n, 2)
        hidden, _ = self.fuse(ids, None, visual_tokens, visual_mask, grid)
        return masked_mean(hidden[:, 2:], visual_mask)

    def text_only(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Single-modality text pass (one masked-out visual slot, so nothing visual is attended) → mean text
        output (B, C)."""
        n, c = input_ids.shape[0], self.config.transformer.hidden_size
        dtype = self.transformer.word_embeddings.weight.dtype
        dummy = torch.zeros(n, 1, c, device=input_ids.device, dtype=dtype)
        none = torch.zeros(n, 1, dtype=torch.bool, device=input_ids.device)
        hidden, _ = self.fuse(input_ids, attention_mask, dummy, none, (1, 1))
        return masked_mean(hidden[:, : input_ids.shape[1]], attention_mask.bool())

    def set_backbone_trainable(self, flag: bool) -> None:
        """Cold start: False freezes the ResNet trunk (requires_grad and BatchNorm statistics)."""
        self.encoder.set_backbone_trainable(flag)

    def forward(
        self,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> SohoModelOutput:
        if input_ids.shape[0] != pixel_values.shape[0]:
            raise ValueError(
                f"input_ids batch {input_ids.shape[0]} != pixel_values batch {pixel_values.shape[0]}"
            )
        enc = self.encode_visual(pixel_values, pixel_mask)
        v = enc.visual
        hidden, pooled = self.fuse(input_ids, attention_mask, v.tokens, v.mask, v.grid)
        return SohoModelOutput(hidden, pooled, int(input_ids.shape[1]), v.mask, enc.vd, v.grid)

    # -- persistence --------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        return save_model(directory, self, self.config, "SohoModel", soho_format_version=FORMAT_VERSION)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> SohoModel:
        """Loads a directory written by ``SohoModel.save_pretrained``, ``SohoForPretraining.save_pretrained``
        or a task model's (then only the ``soho.*`` backbone part)."""
        config, _, state = read_model(directory)
        return cls.from_state(config, state)

    @classmethod
    def from_state(cls, config: SohoConfig, state: dict[str, torch.Tensor]) -> SohoModel:
        """A SohoModel with the weights of a bare state dict or of the ``soho.*`` part of a wrapping
        model's."""
        if any(k.startswith("soho.") for k in state):
            state = sub_state(state, "soho.")
        model = cls(config, load_pretrained=False)
        model.load_state_dict(state, strict=True)
        return model


class LossTerm(NamedTuple):
    """One pre-training objective of a batch: its mean loss, detached accuracy and position count."""

    loss: torch.Tensor
    acc: torch.Tensor
    count: torch.Tensor


def _masked_ce(logits: torch.Tensor, targets: torch.Tensor) -> LossTerm:
    """Mean cross-entropy over N rows (0 with a grad_fn when N = 0), accuracy, count."""
    n = torch.tensor(targets.numel(), device=logits.device)
    loss = F.cross_entropy(logits.float(), targets, reduction="sum") / n.clamp(min=1)
    correct = (logits.detach().argmax(dim=-1) == targets).sum()
    acc = correct.float() / n.clamp(min=1).float()
    return LossTerm(loss, acc.detach(), n)


class _SingleModality(NamedTuple):
    """The ITC passes of a pre-training batch: normalised image-only and text-only embeddings (B, D) and
    their detached fp32 similarity (B images, B captions), computed once for hard negatives and accuracy."""

    image: torch.Tensor
    text: torch.Tensor
    similarity: torch.Tensor


@dataclass
class _JointPass:
    """The corrupted joint pass of one pre-training batch and the targets its terms are taken on."""

    hidden: torch.Tensor  # (B, T+L, C)
    pooled: torch.Tensor  # (B, C)
    attention_mask: torch.Tensor  # (B, T) of the (possibly swapped) captions
    visual_mask: torch.Tensor  # (B, L) bool
    mlm_labels: torch.Tensor  # (B, T): token id at MLM positions of matched rows, -100 elsewhere
    mvm_positions: torch.Tensor  # (B, L) bool: masked visual tokens of matched rows
    vd_indices: torch.Tensor  # (B, L): VD index of each token before masking (the MVM target)
    itm_labels: torch.Tensor  # (B,) 1 = matched

    @property
    def text_len(self) -> int:
        return int(self.attention_mask.shape[1])


class SohoForPretraining(nn.Module):
    """L = L_MLM + L_MVM + L_ITM (+ w·L_ITC) over one forward pass of mixed matched/swapped pairs.

    Corruption (MLM tokens, MVM visual tokens) is applied to every row so that its presence carries no
    ITM signal; MLM and MVM losses are taken on matched rows only."""

    def __init__(self, config: SohoConfig, load_pretrained: bool = True) -> None:
        super().__init__()
        self.config = config
        self.soho = SohoModel(config, load_pretrained=load_pretrained)
        c, t = config.transformer.hidden_size, config.transformer
        self.mlm_head = MLMHead(c, t.vocab_size, t.layer_norm_eps)
        self.mvm_head = MVMHead(c, config.vd.num_codes, t.layer_norm_eps, tied=config.pretrain.mvm_head_tied)
        self.itm_head = ITMHead(c, interaction=config.pretrain.itm_interaction)
        p = config.pretrain
        self.itc = ContrastiveProjection(c, c, p.itc_embed_dim) if p.itc_weight > 0 else None

    def itc_embeddings(
        self, visual_tokens: torch.Tensor, visual_mask: torch.Tensor, grid: tuple[int, int],
        input_ids: torch.Tensor, attention_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised ITC embeddings (B, D) of the image-only and text-only passes."""
        if self.itc is None:
            raise ValueError("itc_embeddings needs pretrain.itc_weight > 0 (the model has no ITC projection)")
        image = self.itc.embed_image(self.soho.image_only(visual_tokens, visual_mask, grid))
        return image, self.itc.embed_text(self.soho.text_only(input_ids, attention_mask))

    def forward(
        self,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> PretrainOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        images = self.soho.encode_visual(pixel_values, pixel_mask)
        single = self._single_modality_pass(images, input_ids, attention_mask)  # None without ITC
        joint = self._joint_pass(images, input_ids, attention_mask, single, generator)
        mlm, mvm, itm = self._mlm_term(joint), self._mvm_term(joint), self._itm_term(joint)
        itc = self._itc_term(single)
        loss = mlm.loss + mvm.loss + itm.loss + self.config.pretrain.itc_weight * itc.loss
        return PretrainOutput(
            loss=loss,
            mlm_loss=mlm.loss,
            mvm_loss=mvm.loss,
            itm_loss=itm.loss,
            mlm_acc=mlm.acc,
            mvm_acc=mvm.acc,
            itm_acc=itm.acc,
            mlm_count=mlm.count,
            mvm_count=mvm.count,
            itm_labels=joint.itm_labels,
            itc_loss=itc.loss,
            itc_acc=itc.acc,
        )

    # -- the pre-training batch ---------------------------------------------------------------------------
    def _single_modality_pass(
        self, images: EncodedImages, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> _SingleModality | None:
        """ITC (optional): image-only and text-only passes on the uncorrupted images and captions."""
        if self.itc is None:
            return None
        v = images.visual
        image, text = self.itc_embeddings(v.tokens, v.mask, v.grid, input_ids, attention_mask)
        return _SingleModality(image, text, image.detach().float() @ text.detach().float().t())

    def _itm_similarity(self, images: EncodedImages, single: _SingleModality | None) -> torch.Tensor | None:
        """(B images, B captions) similarity that hard negatives are drawn from (None = uniform partners):
        with ITC on, that of the ITC embeddings (ALBEF); without it, that of the images' mean features."""
        if not self.config.pretrain.hard_negatives:
            return None
        if single is not None:
            return single.similarity
        mask = images.visual.mask
        m = mask[..., None].to(images.features.dtype)
        mean = (images.features.detach() * m).sum(1) / m.sum(1).clamp(min=1)  # (B, C)
        mean = F.normalize(mean.float(), dim=-1)
        return mean @ mean.t()  # (B, B)

    def _joint_pass(
        self,
        images: EncodedImages,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        single: _SingleModality | None,
        generator: torch.Generator | None,
    ) -> _JointPass:
        """Swap captions in-batch (ITM), corrupt every row (MLM tokens, MVM visual tokens), fuse. The
        generator is drawn in this order: ITM partners, MLM positions and replacements, MVM indices."""
        cfg = self.config
        text_index, itm_labels = sample_itm_pairs(
            input_ids.shape[0],
            cfg.pretrain.itm_neg_prob,
            generator,
            input_ids.device,
            self._itm_similarity(images, single),
            cfg.pretrain.hard_negative_temperature,
        )
        ids, am = input_ids[text_index], attention_mask[text_index]
        matched = itm_labels.bool()
        ids_in, mlm_labels = mask_tokens(ids, am, cfg.transformer, cfg.pretrain, generator)
        v = images.visual
        masked_visual, _ = mask_visual(images.vd.indices, v.mask, cfg.vd.num_codes, cfg.pretrain.mvm_prob,
                                       generator)
        hidden, pooled = self.soho.fuse(ids_in, am, v.tokens, v.mask, v.grid, masked_visual)
        return _JointPass(
            hidden=hidden,
            pooled=pooled,
            attention_mask=am,
            visual_mask=v.mask,
            mlm_labels=mlm_labels.masked_fill(~matched[:, None], -100),  # targets only on matched rows
            mvm_positions=masked_visual & matched[:, None],
            vd_indices=images.vd.indices,
            itm_labels=itm_labels,
        )

    def _mlm_term(self, joint: _JointPass) -> LossTerm:
        text_h = joint.hidden[:, : joint.text_len]  # (B, T, C)
        sel = joint.mlm_labels != -100  # (B, T)
        logits = self.mlm_head(text_h[sel], self.soho.transformer.word_embeddings.weight)
        return _masked_ce(logits, joint.mlm_labels[sel])

    def _mvm_term(self, joint: _JointPass) -> LossTerm:
        vis_h = joint.hidden[:, joint.text_len :]  # (B, L, C)
        sel = joint.mvm_positions
        logits = self.mvm_head(vis_h[sel], self.soho.visual_dictionary.codebook)
        return _masked_ce(logits, joint.vd_indices[sel])  # target: the index before masking

    def _itm_term(self, joint: _JointPass) -> LossTerm:
        logits = self.itm_head(joint.pooled, joint.hidden, joint.attention_mask, joint.visual_mask)
        labels = joint.itm_labels
        loss = F.cross_entropy(logits.float(), labels)
        acc = (logits.detach().argmax(-1) == labels).float().mean()
        return LossTerm(loss, acc, torch.tensor(labels.numel(), device=labels.device))

    def _itc_term(self, single: _SingleModality | None) -> LossTerm:
        """InfoNCE of the image-only/text-only embeddings (unweighted) and the in-batch image→text top-1
        accuracy; zeros when ITC is off."""
        device = self.itm_head.classifier.weight.device
        if single is None or self.itc is None:
            zero = torch.zeros((), device=device)
            return LossTerm(zero, zero, torch.zeros((), dtype=torch.long, device=device))
        b = single.image.shape[0]
        loss = info_nce_loss(single.image.float(), single.text.float(), self.itc.logit_scale())
        acc = (single.similarity.argmax(dim=1) == torch.arange(b, device=device)).float().mean()
        return LossTerm(loss, acc, torch.tensor(b, device=device))

    def itm_logits(
        self,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, 2) match logits without any masking, for retrieval and evaluation."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        out = self.soho(pixel_values, pixel_mask, input_ids, attention_mask)
        return self.itm_head(out.pooled, out.last_hidden_state, attention_mask, out.visual_mask)

    def save_pretrained(self, directory: str | Path) -> Path:
        return save_model(directory, self, self.config, "SohoForPretraining",
                          soho_format_version=FORMAT_VERSION)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> SohoForPretraining:
        config, _, state = read_model(directory)
        if not any(k.startswith("soho.") for k in state):
            raise ValueError(
                f"{directory}: holds a bare SohoModel (no pre-training heads); "
                "load it with SohoModel.from_pretrained"
            )
        model = cls(config, load_pretrained=False)
        model.load_state_dict(state, strict=True)
        return model
