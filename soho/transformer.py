"""Cross-modal transformer: [CLS] text [SEP] + visual tokens in one sequence through BERT layers.

The text side uses BERT's own embeddings (word + position + token type 0); the visual side uses
``VisualEmbeddings`` (VD codes + 2-D sinusoidal position + token type 1). The concatenated sequence runs
through ``transformers``' ``BertEncoder`` with one additive attention mask over both parts.
"""

from __future__ import annotations

import torch
from torch import nn

from soho.config import TransformerConfig
from soho.embeddings import VisualEmbeddings
from soho.text import build_bert


class CrossModalEncoder(nn.Module):
    def __init__(self, config: TransformerConfig, load_pretrained: bool = True) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.bert = build_bert(config, load_pretrained=load_pretrained)  # embeddings, encoder, pooler
        self.visual_embeddings = VisualEmbeddings(
            config.hidden_size, config.layer_norm_eps, config.hidden_dropout
        )

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.bert.embeddings.word_embeddings

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        visual_tokens: torch.Tensor,
        visual_mask: torch.Tensor,
        grid: tuple[int, int],
        masked_visual: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids/attention_mask (B, T); visual_tokens (B, L, C); visual_mask (B, L) bool;
        masked_visual (B, L) bool positions replaced by the MVM mask embedding.
        Returns (hidden (B, T+L, C), pooled (B, C) = BERT pooler (dense+tanh) over the [CLS] output)."""
        if input_ids.shape[1] > self.config.max_text_len:
            raise ValueError(
                f"input_ids has {input_ids.shape[1]} tokens; TransformerConfig.max_text_len is {self.config.max_text_len}"
            )
        emb = self.bert.embeddings
        text = emb(input_ids=input_ids, token_type_ids=torch.zeros_like(input_ids))  # (B, T, C)
        vis = self.visual_embeddings(
            visual_tokens, grid, emb.token_type_embeddings, masked_visual
        )  # (B, L, C)
        vis = vis.to(text.dtype)
        hidden = torch.cat([text, vis], dim=1)  # (B, T+L, C)
        keep = torch.cat([attention_mask.to(torch.bool), visual_mask.to(torch.bool)], dim=1)  # (B, T+L)
        # Additive mask (B, 1, 1, T+L): 0 where attended, dtype-min on padding; accepted by eager and sdpa.
        additive = (~keep)[:, None, None, :].to(hidden.dtype) * torch.finfo(hidden.dtype).min
        hidden = self.bert.encoder(hidden, attention_mask=additive)[0]
        pooled = self.bert.pooler(hidden)
        return hidden, pooled
