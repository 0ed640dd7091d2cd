"""Word-level caption augmentation for pre-training (off by default).

A model trained on captions from a few sentence frames learns the frames as well as the content: words it
never met reach a randomly initialised text side as noise, and a description in another word order is a new
input. Three perturbations, applied independently per caption (after Wei & Zou's "EDA", 2019, without its
synonym step, which needs a thesaurus):

* ``delete``: each word is dropped with this probability (a caption keeps at least one word);
* ``insert``: after each word, a word drawn uniformly from the tokenizer's whole-word vocabulary is inserted
  with this probability (unknown function words become something the model has learnt to look past);
* ``swap``: each pair of neighbouring words is swapped with this probability (left to right, a swapped word
  is not swapped again).

Everything is deterministic given the ``random.Random`` passed in: the loader seeds it by (run seed, sample
key, the sample's place in the stream), so a resumed run sees the same augmented captions.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["TextAugment", "augment_caption", "vocabulary_words"]


@dataclass(frozen=True)
class TextAugment:
    delete: float = 0.0
    insert: float = 0.0
    swap: float = 0.0

    def __post_init__(self) -> None:
        for name in ("delete", "insert", "swap"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                raise ValueError(f"TextAugment.{name}={p}: a probability in [0, 1)")

    @property
    def enabled(self) -> bool:
        return self.delete > 0 or self.insert > 0 or self.swap > 0


def vocabulary_words(tokenizer: Any, min_len: int = 2) -> list[str]:
    """The tokenizer vocabulary's whole lowercase words (no ``##`` pieces, no ``[SPECIAL]`` tokens, no digits
    or punctuation), sorted: what ``insert`` draws from."""
    vocab = tokenizer.get_vocab()
    words = sorted(w for w in vocab if len(w) >= min_len and w.isascii() and w.isalpha() and w.islower())
    if not words:
        raise ValueError(f"{type(tokenizer).__name__}: no whole words in a vocabulary of {len(vocab)} tokens")
    return words


def augment_caption(text: str, rng: random.Random, aug: TextAugment, words: Sequence[str]) -> str:
    """``text`` with ``aug``'s perturbations (see the module docstring); unchanged when none is enabled."""
    if not aug.enabled:
        return text
    tokens = text.split()
    if aug.delete > 0 and len(tokens) > 1:
        kept = [t for t in tokens if rng.random() >= aug.delete]
        tokens = kept or [rng.choice(tokens)]
    if aug.insert > 0:
        out: list[str] = []
        for t in tokens:
            out.append(t)
            if rng.random() < aug.insert:
                out.append(words[rng.randrange(len(words))])
        tokens = out
    if aug.swap > 0:
        i = 0
        while i < len(tokens) - 1:
            if rng.random() < aug.swap:
                tokens[i], tokens[i + 1] = tokens[i + 1], tokens[i]
                i += 2
            else:
                i += 1
    return " ".join(tokens)
