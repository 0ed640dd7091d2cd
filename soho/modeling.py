"""SohoModel (encoder E → VD → cross-modal transformer) and SohoForPretraining (MLM + MVM + ITM).

Persistence: ``save_pretrained(dir)`` writes ``config.json`` (the SohoConfig as a dict) and
``model.safetensors`` (fp32 state dict); ``from_pretrained(dir)`` rebuilds from the config without
touching any hub or pretrained file and loads the tensors with safetensors (no pickle).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from soho.config import SohoConfig
from soho.encoder import GridEncoder
from soho.heads import ContrastiveProjection, ITMHead, MLMHead, MVMHead, info_nce_loss, masked_mean
from soho.masking import mask_tokens, mask_visual, sample_itm_pairs
from soho.transformer import CrossModalEncoder
from soho.visual_dictionary import VDOutput, VisualDictionary

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1


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


def _save(module: nn.Module, config: SohoConfig, directory: str | Path, kind: str) -> Path:
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, t in module.state_dict().items():
        t = t.detach().to("cpu")
        tensors[name] = (t.float() if t.is_floating_point() else t).contiguous()
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt", "soho_class": kind})
    meta = {"soho_format_version": FORMAT_VERSION, "soho_class": kind, "config": config.to_dict()}
    (out / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return out


def _read(directory: str | Path) -> tuple[SohoConfig, dict[str, torch.Tensor]]:
    d = Path(directory)
    cfg_path, weights_path = d / CONFIG_NAME, d / WEIGHTS_NAME
    for p in (cfg_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"from_pretrained({str(directory)!r}): missing {p.name}")
    meta = json.loads(cfg_path.read_text())
    if "config" not in meta:
        raise ValueError(f"{cfg_path}: not a SOHO config (no 'config' key)")
    return SohoConfig.from_dict(meta["config"]), load_file(str(weights_path))


class SohoModel(nn.Module):
    """Image + text → joint hidden states. ``load_pretrained`` fetches the ResNet/BERT weights named in the
    config (False when restoring a saved model, so nothing is read besides the checkpoint)."""

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

    def fuse(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        visual_tokens: torch.Tensor,
        visual_mask: torch.Tensor,
        grid: tuple[int, int],
        masked_visual: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-modal transformer over [text | visual]; returns (hidden (B, T+L, C), pooled (B, C))."""
        return self.transformer(input_ids, attention_mask, visual_tokens, visual_mask, grid, masked_visual)

    def image_only(self, visual_tokens: torch.Tensor, visual_mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Single-modality image pass ([CLS] [SEP] + visual tokens, no caption) → mean visual output (B, C)."""
        n, cfg = visual_tokens.shape[0], self.config.transformer
        ids = torch.tensor([[cfg.cls_token_id, cfg.sep_token_id]], device=visual_tokens.device).expand(n, 2)
        hidden, _ = self.fuse(ids, torch.ones_like(ids), visual_tokens, visual_mask, grid)
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
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if input_ids.shape[0] != pixel_values.shape[0]:
            raise ValueError(
                f"input_ids batch {input_ids.shape[0]} != pixel_values batch {pixel_values.shape[0]}"
            )
        features, visual_mask, grid = self.encode_image_grid(pixel_values, pixel_mask)
        vd = self.visual_dictionary(features, visual_mask)
        hidden, pooled = self.fuse(input_ids, attention_mask, vd.quantized, visual_mask, grid)
        return SohoModelOutput(hidden, pooled, int(input_ids.shape[1]), visual_mask, vd, grid)

    # -- persistence --------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        return _save(self, self.config, directory, "SohoModel")

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> SohoModel:
        """Loads a directory written by ``SohoModel.save_pretrained`` or ``SohoForPretraining.save_pretrained``
        (then only the ``soho.*`` backbone part)."""
        config, state = _read(directory)
        if any(k.startswith("soho.") for k in state):
            state = {k[len("soho.") :]: v for k, v in state.items() if k.startswith("soho.")}
        model = cls(config, load_pretrained=False)
        model.load_state_dict(state, strict=True)
        return model


def _masked_ce(
    logits: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over N rows (0 with a grad_fn when N = 0), accuracy, count."""
    n = torch.tensor(targets.numel(), device=logits.device)
    loss = F.cross_entropy(logits.float(), targets, reduction="sum") / n.clamp(min=1)
    correct = (logits.detach().argmax(dim=-1) == targets).sum()
    acc = correct.float() / n.clamp(min=1).float()
    return loss, acc, n


class SohoForPretraining(nn.Module):
    """L = L_MLM + L_MVM + L_ITM over one forward pass of mixed matched/swapped pairs.

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
        cfg, soho = self.config, self.soho
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        b, t = input_ids.shape
        features, visual_mask, grid = soho.encode_image_grid(pixel_values, pixel_mask)  # (B, L, C), (B, L)
        vd = soho.visual_dictionary(features, visual_mask)

        # ITC (optional): single-modality passes on the uncorrupted images and captions of this batch.
        image_emb = text_emb = itc_sim = None
        if self.itc is not None:
            image_emb, text_emb = self.itc_embeddings(vd.quantized, visual_mask, grid, input_ids, attention_mask)
            itc_sim = image_emb.detach().float() @ text_emb.detach().float().t()  # (B images, B captions)

        # ITM: swap captions in-batch. Hard negatives: captions drawn ∝ exp(sim / T) — with ITC on, sim is
        # the ITC image-text similarity (ALBEF); without it, that of the images' mean visual features.
        similarity = None
        if cfg.pretrain.hard_negatives and itc_sim is not None:
            similarity = itc_sim
        elif cfg.pretrain.hard_negatives:
            m = visual_mask[..., None].to(features.dtype)
            mean = (features.detach() * m).sum(1) / m.sum(1).clamp(min=1)  # (B, C)
            mean = F.normalize(mean.float(), dim=-1)
            similarity = mean @ mean.t()  # (B, B)
        text_index, itm_labels = sample_itm_pairs(
            b,
            cfg.pretrain.itm_neg_prob,
            generator,
            input_ids.device,
            similarity,
            cfg.pretrain.hard_negative_temperature,
        )
        ids, am = input_ids[text_index], attention_mask[text_index]
        matched = itm_labels.bool()

        # MLM / MVM corruption on all rows; targets only on matched rows.
        ids_in, mlm_labels = mask_tokens(ids, am, cfg.transformer, cfg.pretrain, generator)
        mlm_labels = mlm_labels.masked_fill(~matched[:, None], -100)
        masked_visual, _ = mask_visual(
            vd.indices, visual_mask, cfg.vd.num_codes, cfg.pretrain.mvm_prob, generator
        )

        hidden, pooled = soho.fuse(ids_in, am, vd.quantized, visual_mask, grid, masked_visual)
        text_h, vis_h = hidden[:, :t], hidden[:, t:]  # (B, T, C), (B, L, C)

        mlm_sel = mlm_labels != -100  # (B, T)
        mlm_logits = self.mlm_head(text_h[mlm_sel], soho.transformer.word_embeddings.weight)
        mlm_loss, mlm_acc, mlm_n = _masked_ce(mlm_logits, mlm_labels[mlm_sel])

        mvm_sel = masked_visual & matched[:, None]  # (B, L)
        mvm_logits = self.mvm_head(vis_h[mvm_sel], soho.visual_dictionary.codebook)
        mvm_loss, mvm_acc, mvm_n = _masked_ce(mvm_logits, vd.indices[mvm_sel])  # target: index before masking

        itm_logits = self.itm_head(pooled, hidden, am, visual_mask)
        itm_loss = F.cross_entropy(itm_logits.float(), itm_labels)
        itm_acc = (itm_logits.detach().argmax(-1) == itm_labels).float().mean()

        itc_loss, itc_acc = torch.zeros((), device=itm_loss.device), torch.zeros((), device=itm_loss.device)
        loss = mlm_loss + mvm_loss + itm_loss
        if self.itc is not None:
            itc_loss = info_nce_loss(image_emb.float(), text_emb.float(), self.itc.logit_scale())
            itc_acc = (itc_sim.argmax(dim=1) == torch.arange(b, device=itc_sim.device)).float().mean()
            loss = loss + cfg.pretrain.itc_weight * itc_loss

        return PretrainOutput(
            loss=loss,
            mlm_loss=mlm_loss,
            mvm_loss=mvm_loss,
            itm_loss=itm_loss,
            mlm_acc=mlm_acc.detach(),
            mvm_acc=mvm_acc.detach(),
            itm_acc=itm_acc.detach(),
            mlm_count=mlm_n,
            mvm_count=mvm_n,
            itm_labels=itm_labels,
            itc_loss=itc_loss,
            itc_acc=itc_acc,
        )

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
        return _save(self, self.config, directory, "SohoForPretraining")

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> SohoForPretraining:
        config, state = _read(directory)
        if not any(k.startswith("soho.") for k in state):
            raise ValueError(
                f"{directory}: holds a bare SohoModel (no pre-training heads); load it with SohoModel.from_pretrained"
            )
        model = cls(config, load_pretrained=False)
        model.load_state_dict(state, strict=True)
        return model
