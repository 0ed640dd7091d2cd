"""Cross-modal transformer: [CLS] text [SEP] + visual tokens in one sequence through BERT layers.

The text side uses BERT's own embeddings (``embed_text``: word + position + token type 0); the visual side
uses ``VisualEmbeddings`` (``embed_visual``: VD codes + 2-D sinusoidal position + token type 1). Joining the
two and their masks is ``SohoModel.fuse``'s job (the one place that does it); ``forward`` runs the joined
sequence through ``transformers``' ``BertEncoder`` with one additive attention mask, then BERT's pooler.
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
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, flag: bool = True) -> None:
        """Recompute each BERT layer in backward instead of keeping its activations: ``transformers``' own
        per-layer checkpointing, which wraps every layer call of ``self.bert.encoder`` (the one ``forward``
        below makes). Non-reentrant (``use_reentrant=False``: the additive mask goes by keyword and works
        with inputs that need no grad) and with the RNG state preserved, so the replay draws the same dropout
        masks: losses and gradients equal the plain path. ``activation_checkpointing_enable`` is the name
        from transformers 5.2x on; ``gradient_checkpointing_enable`` before (a deprecated alias since)."""
        self.grad_checkpointing = bool(flag)
        bert = self.bert
        if flag:
            kwargs = {"use_reentrant": False, "preserve_rng_state": True}
            if hasattr(bert, "activation_checkpointing_enable"):
                bert.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                bert.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        elif hasattr(bert, "activation_checkpointing_disable"):
            bert.activation_checkpointing_disable()
        else:
            bert.gradient_checkpointing_disable()

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.bert.embeddings.word_embeddings

    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids → (B, T, C): BERT's word + position + token-type-0 embeddings."""
        if input_ids.shape[1] > self.config.max_text_len:
            raise ValueError(
                f"input_ids has {input_ids.shape[1]} tokens; "
                f"TransformerConfig.max_text_len is {self.config.max_text_len}"
            )
        return self.bert.embeddings(input_ids=input_ids, token_type_ids=torch.zeros_like(input_ids))

    def embed_visual(
        self, visual_tokens: torch.Tensor, grid: tuple[int, int], masked_visual: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, L, C) VD tokens → (B, L, C): + 2-D position + token-type-1 embedding; ``masked_visual`` (B, L)
        bool positions are replaced by the MVM mask embedding."""
        return self.visual_embeddings(visual_tokens, grid, self.bert.embeddings.token_type_embeddings,
                                      masked_visual)

    def forward(self, embeddings: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """BERT layers over an already joined sequence: embeddings (B, N, C), keep (B, N) bool (False =
        padding, never attended). Returns (hidden (B, N, C), pooled (B, C) = BERT pooler (dense + tanh)
        over position 0). ``SohoModel.fuse`` is the one caller: it builds the [text; visual] sequence."""
        # Additive mask (B, 1, 1, N): 0 where attended, dtype-min on padding; accepted by eager and sdpa.
        additive = (~keep)[:, None, None, :].to(embeddings.dtype) * torch.finfo(embeddings.dtype).min
        hidden = self.bert.encoder(embeddings, attention_mask=additive)[0]
        return hidden, self.bert.pooler(hidden)
