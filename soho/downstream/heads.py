"""Task heads and their losses (paper §4: VQA, NLVR2, SNLI-VE; the retrieval prefilter's projections and
InfoNCE loss live in `soho.heads`, shared with the optional pre-training ITC term, and are re-exported here).

Heads take pooled transformer outputs ([CLS]) and know nothing about images or text; the task models in
`soho.downstream.modeling` wire them onto `SohoModel`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from soho.heads import ContrastiveProjection, info_nce_loss

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
