"""Paraphrased captions of synthetic scenes: a test of language generalisation, never trained on.

``data_pipeline.synth.make_caption`` describes a scene with a handful of fixed sentence frames ("a small red
circle to the left of a large blue square, and also …", "there are three objects: … . the … is above the
…"). A model can learn to match those frames rather than the scene, and nothing in a held-out set written by
the same generator would show it. This module describes the same scene graphs with **other** frames: other
sentence structures, word orders (the attributes after the noun: "a circle that is small and red"; the
relation before its subject: "to the left of the blue square you will find …") and function words the
generator never uses ("we see", "in total", "lies", "near the … edge", "as well as", "backdrop"), while the
concept words stay the same (shapes, colours, sizes, counts, grid positions, the four relations). The
held-out evaluation (``orchestration.pretrain.heldout_eval``) scores a model on both caption sets of the
same held-out scenes; the gap is what the model learnt about the templates rather than the scenes.

The frames here must stay out of the training generator: ``tests/data_pipeline/test_paraphrase.py`` checks
that every paraphrase carries words the generator never produces and that its concept words are all ones
the generator does produce.
"""

from __future__ import annotations

import random
from typing import Any

from data_pipeline.synth import COLS, NUMBER_WORDS, ROWS, Scene, SceneObject, count_groups, relation

__all__ = ["paraphrase_caption", "scene_from_dict"]


def scene_from_dict(d: dict[str, Any]) -> Scene:
    """The inverse of ``Scene.to_dict`` (the ``scene`` field of a synthetic sample's json)."""
    try:
        objs = tuple(SceneObject(str(o["shape"]), str(o["colour"]), str(o["size"]), int(o["row"]),
                                 int(o["col"]), float(o["x"]), float(o["y"])) for o in d["objects"])
        return Scene(objs, str(d["background"]), bool(d["noisy"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(
            f"not a synthetic scene description ({type(exc).__name__}: {exc}): {d!r:.200}") from exc


def _article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def _noun(o: SceneObject, rng: random.Random, definite: bool = False) -> str:
    """One object, attributes before the noun (as the generator does) or after it (as it never does)."""
    if rng.random() < 0.5:
        words = f"{o.size} {o.colour} {o.shape}"
        return f"the {words}" if definite else _article(words)
    return f"{'the' if definite else _article(o.shape).split()[0]} {o.shape} that is {o.size} and {o.colour}"


def _group(objs: list[SceneObject], rng: random.Random) -> str:
    """'two circles that are small and red as well as a square that is large and blue'."""
    parts = []
    for (size, colour, shape), c in count_groups(objs).items():
        if c == 1:
            parts.append(_noun(SceneObject(shape, colour, size, 0, 0, 0, 0), rng))
        elif rng.random() < 0.5:
            parts.append(f"{NUMBER_WORDS[c]} {shape}s that are {size} and {colour}")
        else:
            parts.append(f"{NUMBER_WORDS[c]} {size} {colour} {shape}s")
    if len(parts) == 1:
        return parts[0]
    return " as well as ".join([", ".join(parts[:-1]), parts[-1]])


def _place(o: SceneObject) -> str:
    """Where one object is, in words the generator's locations never use ('near the left edge')."""
    if o.row == 1 and o.col == 1:
        return "near the center"
    if o.row == 1:
        return f"near the {COLS[o.col]} edge"
    if o.col == 1:
        return f"near the {ROWS[o.row]} edge"
    return f"near the {ROWS[o.row]} {COLS[o.col]}"


def paraphrase_caption(scene: Scene, rng: random.Random) -> str:
    """A description of ``scene`` in one of the paraphrase frames (deterministic given ``rng``)."""
    objs = list(scene.objects)
    if not objs:
        raise ValueError("a scene without objects has no caption")
    backdrop = f", against a {scene.background} backdrop" if rng.random() < 0.3 else ""
    if len(objs) == 1:
        o = objs[0]
        frame = rng.randrange(4)
        if frame == 0:
            return f"only {_noun(o, rng)} is visible, {_place(o)}{backdrop}"
        if frame == 1:
            return f"{_place(o)} we find {_noun(o, rng)}{backdrop}"
        if frame == 2:
            return f"this photo shows just {_noun(o, rng)} placed {_place(o)}"
        return f"{_noun(o, rng)} sits {_place(o)}{backdrop}"
    a, b = rng.sample(objs, 2)
    rel = relation(a, b)
    others = [o for o in objs if o is not a and o is not b]
    count = NUMBER_WORDS[len(objs)]
    frame = rng.randrange(4)
    if frame == 0:
        rest = f"; plus {_group(others, rng)}" if others else ""
        return f"{_noun(b, rng)} can be seen with {_noun(a, rng)} sitting {rel} it{rest}{backdrop}"
    if frame == 1:
        return (f"we see {count} things in total: {_group(objs, rng)}. "
                f"{_noun(a, rng, definite=True)} lies {rel} {_noun(b, rng, definite=True)}")
    if frame == 2:
        rest = f", next to {_group(others, rng)}" if others else ""
        return f"{rel} {_noun(b, rng, definite=True)} you will find {_noun(a, rng)}{rest}"
    return (f"{_group(objs, rng)} appear in this photo{backdrop}, and {_noun(a, rng, definite=True)} "
            f"has been placed {rel} {_noun(b, rng, definite=True)}")
