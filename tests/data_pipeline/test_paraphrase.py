"""The paraphrase captions: same concept words as the training generator, frames it never produces."""

from __future__ import annotations

import random
import re

import pytest

from data_pipeline.paraphrase import paraphrase_caption, scene_from_dict
from data_pipeline.synth import (
    BACKGROUNDS,
    COLOURS,
    COLS,
    NUMBER_WORDS,
    ROWS,
    SHAPES,
    SIZES,
    make_caption,
    make_rich_caption,
    relation,
    sample_scene,
)

CONCEPTS = ({*SHAPES, *(s + "s" for s in SHAPES), *COLOURS, *SIZES, *BACKGROUNDS, *ROWS, *COLS,
             *NUMBER_WORDS.values(), "above", "below"}) - {"middle", "no"}  # words the generator never says


def words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


@pytest.fixture(scope="module")
def generator_vocab() -> set[str]:
    """Every word the training captions use: the generator's frames and the richer grammar's
    (``--synthetic-captions``), so the paraphrases stay out of both."""
    vocab: set[str] = set()
    for i in range(4000):
        rng = random.Random(f"gen/{i}")
        vocab.update(words(make_caption(sample_scene(rng), rng)))
        rng = random.Random(f"rich/{i}")
        vocab.update(words(make_rich_caption(sample_scene(rng), rng)))
    return vocab


def test_rich_captions_name_the_scene_without_the_paraphrase_words() -> None:
    plain: set[str] = set()
    para: set[str] = set()
    for i in range(3000):
        rng = random.Random(f"g/{i}")
        plain.update(words(make_caption(sample_scene(rng), rng)))
        rng = random.Random(f"p/{i}")
        para.update(words(paraphrase_caption(sample_scene(rng), rng)))
    held_out = para - plain  # the paraphrases' own function words
    assert {"we", "near", "edge", "lies", "backdrop", "that"} <= held_out
    converse = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below",
                "below": "above"}
    frames = set()
    for i in range(2000):
        rng = random.Random(f"rich/{i}")
        scene = sample_scene(rng)
        text = make_rich_caption(scene, rng)
        ws = words(text)
        assert not set(ws) & held_out, (text, set(ws) & held_out)
        assert not text.endswith(",") and ",," not in text.replace(" ", ""), text
        for o in scene.objects:
            assert (o.shape in ws or o.shape + "s" in ws) and o.colour in ws and o.size in ws, text
        if len(scene.objects) >= 2:
            objs = scene.objects
            rels = {relation(a, b) for a in objs for b in objs if a is not b}
            assert any(r in text or converse[r] in text for r in rels), text
        frames.add(" ".join(w for w in ws if w not in CONCEPTS and w not in {"a", "an", "the"})[:16])
    assert len(frames) >= 15


def test_paraphrases_use_the_generators_concepts_in_new_frames(generator_vocab: set[str]) -> None:
    assert CONCEPTS <= generator_vocab  # the generator names every concept
    novel_counts = []
    for i in range(2000):
        rng = random.Random(f"para/{i}")
        scene = sample_scene(rng)
        text = paraphrase_caption(scene, rng)
        ws = words(text)
        novel = {w for w in ws if w not in generator_vocab}
        assert len(novel) >= 2, (text, novel)  # at least two function words the generator never uses
        assert not novel & CONCEPTS, (text, novel)  # ... and no concept word the generator lacks
        novel_counts.append(len(novel))
        for o in scene.objects:  # every object is named with all its attributes
            assert o.shape in ws or o.shape + "s" in ws, text
            assert o.colour in ws and o.size in ws, text
        if len(scene.objects) >= 2:  # and one spatial relation between two of them
            objs = scene.objects
            assert any(relation(a, b) in text for a in objs for b in objs if a is not b), text
        else:
            o = scene.objects[0]
            place = "center" if (o.row, o.col) == (1, 1) else (COLS[o.col] if o.row == 1 else ROWS[o.row])
            assert place in ws, text
    assert sum(novel_counts) / len(novel_counts) >= 3


def test_paraphrase_frames_never_coincide_with_generator_captions(generator_vocab: set[str]) -> None:
    frames = set()
    for i in range(600):
        rng = random.Random(f"same/{i}")
        scene = sample_scene(rng)
        gen = {make_caption(scene, random.Random(f"g/{i}/{j}")) for j in range(12)}
        para = paraphrase_caption(scene, random.Random(f"p/{i}"))
        assert para not in gen
        frames.add(" ".join(w for w in words(para) if w not in CONCEPTS and w not in {"a", "an", "the"})[:24])
    assert len(frames) >= 8  # several distinct frames are in use, not one


def test_paraphrase_is_deterministic_and_scene_round_trips() -> None:
    rng = random.Random(7)
    scene = sample_scene(rng)
    assert scene_from_dict(scene.to_dict()) == scene
    assert paraphrase_caption(scene, random.Random("k")) == paraphrase_caption(scene, random.Random("k"))
    with pytest.raises(ValueError, match="not a synthetic scene"):
        scene_from_dict({"objects": [{"shape": "circle"}]})
