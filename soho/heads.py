"""Pre-training heads over the cross-modal transformer output."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class PredictionTransform(nn.Module):
    """dense → GELU → LayerNorm, as in BERT's prediction heads."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(F.gelu(self.dense(x)))


class MLMHead(nn.Module):
    """Masked-language-model head; the output layer is tied to the word embeddings (passed at call time,
    so the weight is stored once and safetensors sees no shared tensors)."""

    def __init__(self, hidden_size: int, vocab_size: int, eps: float) -> None:
        super().__init__()
        self.transform = PredictionTransform(hidden_size, eps)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, hidden: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        """hidden (N, C), word_embeddings (V, C) → logits (N, V)."""
        return F.linear(self.transform(hidden), word_embeddings, self.bias)


class MVMHead(nn.Module):
    """Masked-visual-model head: k-way classification of the VD index at masked visual positions. With
    ``codebook`` given, logits are dot products with the (detached) VD codes instead of a free layer."""

    def __init__(self, hidden_size: int, num_codes: int, eps: float, tied: bool = False) -> None:
        super().__init__()
        self.transform = PredictionTransform(hidden_size, eps)
        self.tied = tied
        self.decoder = None if tied else nn.Linear(hidden_size, num_codes, bias=False)
        self.bias = nn.Parameter(torch.zeros(num_codes))

    def forward(self, hidden: torch.Tensor, codebook: torch.Tensor | None = None) -> torch.Tensor:
        """hidden (N, C) → logits (N, k)."""
        h = self.transform(hidden)
        if self.decoder is None:
            if codebook is None:
                raise ValueError("MVMHead(tied=True) needs the VD codebook")
            return F.linear(h, codebook.detach().to(h.dtype), self.bias)
        return self.decoder(h) + self.bias


class ITMHead(nn.Module):
    """Image-text matching φ: pooled [CLS] (B, C) → 2-way logits (index 1 = match).

    ``interaction=True`` adds a second term (off in the paper's model, on in the CPU recipe): an MLP over
    [t̄ ⊙ v̄, |t̄ − v̄|], where t̄ and v̄ are the masked means of the text and visual outputs of the same
    joint pass. From a random initialisation the [CLS]-only head must discover a text×image interaction
    through attention before its loss can move (a second-order plateau: measured flat at ln 2 for 2,000
    steps of the tiny preset); the product term gives ITM a first-order gradient from step one."""

    def __init__(self, hidden_size: int, interaction: bool = False) -> None:
        super().__init__()
        self.classifier = nn.Linear(hidden_size, 2)
        self.interaction = (
            nn.Sequential(nn.Linear(2 * hidden_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, 2))
            if interaction
            else None
        )

    def forward(
        self,
        pooled: torch.Tensor,
        hidden: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        visual_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """pooled (B, C); with ``interaction``: also the joint hidden states (B, T+L, C), the text
        attention mask (B, T) and the visual mask (B, L) of the same pass."""
        logits = self.classifier(pooled)
        if self.interaction is None:
            return logits
        if hidden is None or attention_mask is None or visual_mask is None:
            raise ValueError(
                "ITMHead(interaction=True) needs hidden, attention_mask and visual_mask of the joint pass"
            )
        t_len = attention_mask.shape[1]
        text = masked_mean(hidden[:, :t_len], attention_mask)
        visual = masked_mean(hidden[:, t_len:], visual_mask)
        return logits + self.interaction(torch.cat([text * visual, (text - visual).abs()], dim=-1))


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, N, C), (B, N) → (B, C): mean over positions where ``mask`` is true (zeros for an empty row)."""
    m = mask[..., None].to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp(min=1)


class ContrastiveProjection(nn.Module):
    """Light projections of pooled single-modality features into a shared space (ALBEF's ITC).

    The paper's SOHO has no contrastive objective, so its unimodal features are not aligned with each other;
    these two linear maps (plus a learned temperature) are trained with an in-batch InfoNCE loss — during
    retrieval fine-tuning for the prefilter (their cosine similarity picks the top-k candidates that the full
    ITM score reranks), and during pre-training when ``pretrain.itc_weight`` > 0.
    """

    def __init__(self, image_dim: int, text_dim: int, embed_dim: int = 256, init_temperature: float = 0.07):
        super().__init__()
        self.image_proj = nn.Linear(image_dim, embed_dim)
        self.text_proj = nn.Linear(text_dim, embed_dim)
        # log(1/T) as in CLIP, so the temperature stays positive; clamped in `logit_scale` to avoid blow-up.
        # Shape (1,), not a 0-dim tensor: DeepSpeed's initial parameter broadcast views every parameter as
        # bytes, which fails on 0-dim tensors ("self.dim() cannot be 0 to view Float as Byte").
        self.log_inv_temperature = nn.Parameter(torch.full((1,), -math.log(init_temperature)))

    def embed_image(self, pooled_image: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(pooled_image), dim=-1)  # (N, D)

    def embed_text(self, pooled_text: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(pooled_text), dim=-1)  # (N, D)

    def logit_scale(self) -> torch.Tensor:
        return self.log_inv_temperature.clamp(max=4.6052).exp().squeeze(0)  # () scalar, <= 100 (CLIP's cap)


def info_nce_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric in-batch contrastive loss: row i of each side is the positive pair, the rest negatives."""
    if image_emb.shape != text_emb.shape:
        raise ValueError(f"image {tuple(image_emb.shape)} and text {tuple(text_emb.shape)} embeddings differ")
    logits = logit_scale * image_emb @ text_emb.t()  # (B, B)
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
