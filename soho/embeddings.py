"""Visual-token embeddings: VD output + 2-D sinusoidal position + modality (token-type) embedding."""

from __future__ import annotations

import math

import torch
from torch import nn


def sinusoid_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """(N,) positions → (N, dim) [sin | cos] with frequencies 1/10000^(2i/dim) (Transformer-style)."""
    half = dim // 2
    freq = torch.exp(
        -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=positions.device) / half
    )
    angles = positions.float()[:, None] * freq[None, :]  # (N, half)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sinusoid_2d(h: int, w: int, dim: int, device: torch.device | None = None) -> torch.Tensor:
    """(h·w, dim) 2-D position embedding in row-major order: first half of the channels encodes the row,
    second half the column (SOHO: row and column halves of c)."""
    if dim % 4:
        raise ValueError(f"2-D sinusoidal position embedding needs dim divisible by 4, got {dim}")
    rows = sinusoid_1d(torch.arange(h, device=device), dim // 2)  # (h, C/2)
    cols = sinusoid_1d(torch.arange(w, device=device), dim // 2)  # (w, C/2)
    grid = torch.cat(
        [rows[:, None, :].expand(h, w, dim // 2), cols[None, :, :].expand(h, w, dim // 2)], dim=-1
    )  # (h, w, C)
    return grid.reshape(h * w, dim)


class VisualEmbeddings(nn.Module):
    """e_i = LayerNorm(f(v_i) + pos2d(row_i, col_i) + type[visual]); MVM-masked positions use a learned
    ``mask_embedding`` instead of f(v_i). The type table is BERT's token-type embedding (row 1 = visual),
    passed in at call time so the weights are not duplicated."""

    def __init__(
        self, hidden_size: int, layer_norm_eps: float, dropout: float, visual_type_id: int = 1
    ) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.visual_type_id = visual_type_id
        self.mask_embedding = nn.Parameter(torch.zeros(hidden_size))
        nn.init.normal_(self.mask_embedding, std=0.02)
        self.layer_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        tokens: torch.Tensor,
        grid: tuple[int, int],
        type_embeddings: nn.Embedding,
        masked_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens (B, L, C) with L = h·w; masked_positions (B, L) bool → (B, L, C)."""
        b, n_tok, c = tokens.shape
        h, w = grid
        if h * w != n_tok:
            raise ValueError(f"visual tokens: L={n_tok} does not match grid {h}×{w}")
        if masked_positions is not None:
            mask_tok = self.mask_embedding.to(tokens.dtype).expand(b, n_tok, c)
            tokens = torch.where(masked_positions[..., None], mask_tok, tokens)
        pos = sinusoid_2d(h, w, c, device=tokens.device).to(tokens.dtype)  # (L, C)
        type_id = torch.full((1, 1), self.visual_type_id, dtype=torch.long, device=tokens.device)
        x = tokens + pos[None] + type_embeddings(type_id).to(tokens.dtype)  # (B, L, C)
        return self.dropout(self.layer_norm(x))
