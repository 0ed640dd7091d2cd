"""Task heads and their losses (paper §4: VQA, NLVR2, SNLI-VE; retrieval prefilter projections).

Heads take pooled transformer outputs ([CLS]) and know nothing about images or text; the task models in
`soho.downstream.modeling` wire them onto `SohoModel`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MLPClassifier",
    "vqa_bce_loss",
    "ContrastiveProjection",
    "info_nce_loss",
]


class MLPClassifier(nn.Module):
    """Linear → GELU → LayerNorm → Linear, the answer/label classifier used over [CLS] by SOHO's VQA head.

    NLVR2 feeds it the two [CLS] outputs joined (in_dim = 2C); SNLI-VE and VQA feed one [CLS] (in_dim = C).
    """

    def __init__(self, in_dim: int, num_classes: int, hidden_dim: int | None = None, dropout: float = 0.1):
        super().__init__()
        if in_dim <= 0 or num_classes <= 0:
            raise ValueError(
                f"MLPClassifier needs positive sizes, got in_dim={in_dim}, num_classes={num_classes}"
            )
        hidden_dim = hidden_dim or 2 * in_dim
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.GELU(),
            nn.LayerNorm(hidden_dim),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, num_classes),
        )

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.net(pooled)  # (B, num_classes)


def vqa_bce_loss(logits: torch.Tensor, target_scores: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy against soft answer scores (0, 0.3, 0.6, 0.9, 1), summed over answers.

    VQA is multi-label: several answers are partly right, so each answer gets an independent sigmoid.
    Averaging over the answer vocabulary would shrink the loss by |A| (~3k) and the gradient with it, so
    the loss is the mean over questions of the sum over answers (the reference's mean × |A|).
    """
    if logits.shape != target_scores.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and target scores {tuple(target_scores.shape)} differ"
        )
    bce = F.binary_cross_entropy_with_logits(logits.float(), target_scores.float(), reduction="none")
    return bce.sum(dim=1).mean()


class ContrastiveProjection(nn.Module):
    """Light projections of pooled single-modality features into a shared space, for the retrieval prefilter.

    SOHO has no contrastive objective, so its unimodal features are not aligned with each other; these two
    linear maps (plus a learned temperature) are trained with an in-batch InfoNCE loss during retrieval
    fine-tuning, and their cosine similarity picks the top-k candidates that the full ITM score reranks.
    """

    def __init__(self, image_dim: int, text_dim: int, embed_dim: int = 256, init_temperature: float = 0.07):
        super().__init__()
        self.image_proj = nn.Linear(image_dim, embed_dim)
        self.text_proj = nn.Linear(text_dim, embed_dim)
        # log(1/T) as in CLIP, so the temperature stays positive; clamped in `logit_scale` to avoid blow-up.
        self.log_inv_temperature = nn.Parameter(
            torch.tensor(float(-torch.log(torch.tensor(init_temperature))))
        )

    def embed_image(self, pooled_image: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(pooled_image), dim=-1)  # (N, D)

    def embed_text(self, pooled_text: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(pooled_text), dim=-1)  # (N, D)

    def logit_scale(self) -> torch.Tensor:
        return self.log_inv_temperature.clamp(max=4.6052).exp()  # at most 100, CLIP's cap


def info_nce_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric in-batch contrastive loss: row i of each side is the positive pair, the rest negatives."""
    if image_emb.shape != text_emb.shape:
        raise ValueError(f"image {tuple(image_emb.shape)} and text {tuple(text_emb.shape)} embeddings differ")
    logits = logit_scale * image_emb @ text_emb.t()  # (B, B)
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
