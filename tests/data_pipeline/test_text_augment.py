"""Caption augmentation: the perturbations' rates, determinism, and the loader applying it resumably."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from data_pipeline.loader import LoaderConfig, PretrainLoader
from data_pipeline.text_augment import TextAugment, augment_caption, vocabulary_words
from data_pipeline.tokenizer import load_tokenizer

CAPTION = "a small red circle to the left of a large blue square on a white background"


@pytest.fixture(scope="module")
def words() -> list[str]:
    return vocabulary_words(load_tokenizer(None))


def test_vocabulary_words_are_whole_lowercase_words(words: list[str]) -> None:
    assert len(words) > 15000  # bert-base-uncased holds ~21k whole words of 2+ letters
    assert all(w.isalpha() and w.islower() and not w.startswith("#") for w in words)
    assert {"circle", "square", "beside"} <= set(words)


def test_each_perturbation_at_its_rate(words: list[str]) -> None:
    n_words = len(CAPTION.split())
    trials = 2000
    deleted = inserted = swapped_captions = 0
    for i in range(trials):
        out = augment_caption(CAPTION, random.Random(i), TextAugment(delete=0.2), words).split()
        assert Counter(out) <= Counter(CAPTION.split())  # only deletions
        deleted += n_words - len(out)
        out = augment_caption(CAPTION, random.Random(i), TextAugment(insert=0.1), words).split()
        inserted += len(out) - n_words
        out = augment_caption(CAPTION, random.Random(i), TextAugment(swap=0.1), words).split()
        assert sorted(out) == sorted(CAPTION.split())  # a permutation
        swapped_captions += out != CAPTION.split()
    assert abs(deleted / (trials * n_words) - 0.2) < 0.02
    assert abs(inserted / (trials * n_words) - 0.1) < 0.015
    assert 0.6 < swapped_captions / trials < 0.9  # 1 - 0.9^15 ≈ 0.79 (at most one swap per pair)
    # deterministic given the rng; off leaves the text alone
    aug = TextAugment(0.1, 0.1, 0.1)
    assert augment_caption(CAPTION, random.Random(5), aug, words) == augment_caption(
        CAPTION, random.Random(5), aug, words)
    assert augment_caption(CAPTION, random.Random(5), TextAugment(), words) == CAPTION
    assert augment_caption("one", random.Random(0), TextAugment(delete=0.99), words) == "one"
    with pytest.raises(ValueError, match="insert=1.5"):
        TextAugment(insert=1.5)


def test_loader_augments_captions_and_a_resumed_loader_repeats_them(synth_dir: Path) -> None:
    def loader(aug: TextAugment) -> PretrainLoader:
        return PretrainLoader(LoaderConfig(urls=str(synth_dir / "pretrain" / "manifest.json"), batch_size=4,
                                           max_image_side=48, pad_multiple=16, resampled=True,
                                           text_augment=aug))

    plain = iter(loader(TextAugment()))
    noisy = loader(TextAugment(delete=0.1, insert=0.2, swap=0.1))
    it = iter(noisy)
    first = [next(it) for _ in range(3)]
    state = noisy.state_dict()
    rest = [next(it) for _ in range(2)]
    base = [next(plain) for _ in range(3)]
    for a, b in zip(first, base, strict=True):
        assert a["keys"] == b["keys"]  # same samples, same images
        assert (a["pixel_values"] == b["pixel_values"]).all()
    tokens = [sum(int(x["attention_mask"].sum()) for x in batches) for batches in (first, base)]
    assert tokens[0] > tokens[1], tokens  # insert (0.2) outweighs delete (0.1)
    assert any(a["input_ids"].tolist() != b["input_ids"].tolist() for a, b in zip(first, base, strict=True))
    resumed = loader(TextAugment(delete=0.1, insert=0.2, swap=0.1))
    resumed.load_state_dict(state)
    again = iter(resumed)
    for a in rest:
        b = next(again)
        assert a["keys"] == b["keys"] and (a["input_ids"] == b["input_ids"]).all()
