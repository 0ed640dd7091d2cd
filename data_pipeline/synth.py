"""Synthetic scenes: the embedded default data for ``python -m soho.train`` and the tests.

Each scene has 1–4 objects (shape, colour, size, grid position) on a plain or noisy background. Captions
come from a small grammar that names every object's attributes, groups counts ("two small red circles")
and states a spatial relation between two objects, so that matching a caption to an image needs more than
global colour statistics (the same colours appear in many scenes, in other shapes and places).
From the same scene graphs we write ground truth for the downstream tasks in the real datasets' formats
(VQA v2, NLVR2, SNLI-VE, Karpathy retrieval split). Everything is deterministic by seed: scene ``i`` of a
stream is drawn from its own ``random.Random`` seeded by (seed, stream, i).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import re
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from data_pipeline.images import encode_jpeg
from data_pipeline.storage import get_fs, join, read_json, write_json
from data_pipeline.writer import ShardSample, ShardWriter

logger = logging.getLogger(__name__)

SHAPES = ("circle", "square", "triangle", "diamond", "star")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 20),
    "purple": (140, 40, 180),
    "orange": (245, 140, 20),
    "black": (15, 15, 15),
    "cyan": (20, 210, 220),
}
SIZES = {"small": 0.085, "large": 0.165}  # radius as a fraction of the image side
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "gray": (165, 165, 165),
    "beige": (235, 220, 190),
}
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
NUMBER_WORDS = {0: "no", 1: "one", 2: "two", 3: "three", 4: "four"}
DONE_MARKER = "synth_done.json"
# Bump when the generator's output changes, so that a cache made by an older version is never reused silently.
SYNTHETIC_CACHE_VERSION = 1


@dataclass
class SynthConfig:
    """What ``make_synthetic`` writes; the defaults are small enough for CPU tests."""

    num: int = 2000
    seed: int = 0
    heldout: int = 0
    image_size: int = 128
    samples_per_shard: int | None = None  # None: about 16 shards (≤1000 per shard) so ranks×workers split
    jpeg_quality: int = 90
    noise_background_prob: float = 0.5
    captions_per_scene: int = 1
    """Captions per pre-training / held-out pair: the ``txt`` one (``make_caption``) plus ``N − 1`` others
    from ``make_rich_caption`` in the json's ``captions`` list, which a loader with ``caption_choice="any"``
    draws from (one per epoch)."""
    vqa_images: tuple[int, int] = (200, 50)  # (train, val)
    vqa_questions_per_image: int = 4
    nlvr2_pairs: tuple[int, int] = (200, 50)  # (train, dev)
    snli_ve_images: tuple[int, int] = (100, 30)  # (train, dev); 3 hypotheses each
    retrieval_images: tuple[int, int, int] = (200, 50, 100)  # (train, val, test)
    retrieval_captions_per_image: int = 5


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    row: int
    col: int
    x: float  # centre, in [0, 1]
    y: float

    def phrase(self, article: str = "a") -> str:
        words = f"{self.size} {self.colour} {self.shape}"
        if article == "a":
            return ("an " if words[0] in "aeiou" else "a ") + words
        return f"{article} {words}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: str
    noisy: bool

    def signature(self) -> tuple:
        return tuple(sorted((o.shape, o.colour, o.size, o.row, o.col) for o in self.objects))

    def to_dict(self) -> dict[str, Any]:
        return {"background": self.background, "noisy": self.noisy,
                "objects": [asdict(o) for o in self.objects]}


# ----------------------------------------------------------------------------------------------- scenes


def sample_scene(rng: random.Random, noise_prob: float = 0.5) -> Scene:
    n = rng.randint(1, 4)
    cells = rng.sample(range(9), n)
    objs = []
    for cell in cells:
        row, col = divmod(cell, 3)
        # Jitter inside the cell keeps relations between different cells unambiguous.
        x = (col + 0.5) / 3 + rng.uniform(-0.04, 0.04)
        y = (row + 0.5) / 3 + rng.uniform(-0.04, 0.04)
        objs.append(SceneObject(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(SIZES)),
                                row, col, x, y))
    return Scene(tuple(objs), rng.choice(list(BACKGROUNDS)), rng.random() < noise_prob)


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        r *= 0.85
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a))
                for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.75, cy), (cx, cy + r), (cx - r * 0.75, cy)]
    if shape == "star":
        pts = []
        for k in range(10):
            a = -math.pi / 2 + k * math.pi / 5
            rr = r if k % 2 == 0 else r * 0.45
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts
    raise ValueError(f"unknown shape {shape!r}")


def render_scene(scene: Scene, size: int, noise_seed: int) -> Image.Image:
    bg = np.empty((size, size, 3), dtype=np.uint8)
    bg[:] = BACKGROUNDS[scene.background]
    if scene.noisy:
        noise = np.random.default_rng(noise_seed).normal(0.0, 18.0, size=(size, size, 1))
        bg = np.clip(bg.astype(np.float32) + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(bg, "RGB")
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        cx, cy, r = o.x * size, o.y * size, SIZES[o.size] * size
        fill = COLOURS[o.colour]
        if o.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon(_polygon(o.shape, cx, cy, r), fill=fill)
    return img


# --------------------------------------------------------------------------------------------- captions


def _plural(shape: str) -> str:
    return shape + "s"


def count_groups(objs: list[SceneObject]) -> dict[tuple[str, str, str], int]:
    """(size, colour, shape) → how many objects of the scene look like that, in order of first appearance."""
    groups: dict[tuple[str, str, str], int] = {}
    for o in objs:
        k = (o.size, o.colour, o.shape)
        groups[k] = groups.get(k, 0) + 1
    return groups


def _group_phrase(objs: list[SceneObject]) -> str:
    """'two small red circles and a large blue square' (identical objects are counted)."""
    parts = []
    for (size, colour, shape), c in count_groups(objs).items():
        if c == 1:
            parts.append(SceneObject(shape, colour, size, 0, 0, 0, 0).phrase())
        else:
            parts.append(f"{NUMBER_WORDS[c]} {size} {colour} {_plural(shape)}")
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def relation(a: SceneObject, b: SceneObject) -> str:
    """Where a is relative to b, along the axis on which they differ most."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


def _location(o: SceneObject) -> str:
    if o.row == 1 and o.col == 1:
        return "in the center"
    if o.row == 1:
        return f"on the {COLS[o.col]}"
    if o.col == 1:
        return f"at the {ROWS[o.row]}"
    return f"in the {ROWS[o.row]} {COLS[o.col]} corner"


def make_caption(scene: Scene, rng: random.Random) -> str:
    objs = list(scene.objects)
    bg = f" on a {scene.background} background" if rng.random() < 0.3 else ""
    if len(objs) == 1:
        o = objs[0]
        template = rng.randrange(3)
        if template == 0:
            return f"{o.phrase()} {_location(o)}{bg}"
        if template == 1:
            return f"a picture of {o.phrase()} {_location(o)}"
        return f"there is one {o.size} {o.colour} {o.shape} {_location(o)}{bg}"
    a, b = rng.sample(objs, 2)
    rel = relation(a, b)
    others = [o for o in objs if o is not a and o is not b]
    n_word = NUMBER_WORDS[len(objs)]
    template = rng.randrange(4)
    if template == 0:
        rest = f", and also {_group_phrase(others)}" if others else ""
        return f"{a.phrase()} {rel} {b.phrase()}{rest}{bg}"
    if template == 1:
        return f"{n_word} shapes: {_group_phrase(objs)}; {a.phrase('the')} is {rel} {b.phrase('the')}"
    if template == 2:
        return f"an image with {_group_phrase(objs)}{bg}, where {a.phrase('the')} is {rel} {b.phrase('the')}"
    return f"there are {n_word} objects: {_group_phrase(objs)}. {a.phrase('the')} is {rel} {b.phrase('the')}"


# Richer training captions: more sentence frames, word orders and function words for the same scene graph
# (``make_rich_caption``). They widen what the training text side meets; they must never use the frames or
# function words of ``data_pipeline.paraphrase``, which tests language generalisation on held-out scenes
# (``tests/data_pipeline/test_paraphrase.py`` checks both generators against it).

_CONVERSE = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below",
             "below": "above"}
_OPENERS = ("a drawing of", "an illustration of", "a render of", "a scene with", "the image contains",
            "here is", "a picture of")
_VERBS = ("is", "is located", "is positioned", "stands", "rests")
_JOIN = (" and ", " along with ", " together with ", " alongside ")


def _article_for(words: str) -> str:
    return "an" if words[0] in "aeiou" else "a"


def _rich_noun(o: SceneObject, rng: random.Random, definite: bool = False) -> str:
    """One object in one of several word orders: attributes before the noun (either order), after it
    ("a circle which is small and red", "a circle, small and red,"), or as modifiers ("of small size",
    "coloured red")."""
    form = rng.randrange(6)
    if form == 0:
        words = f"{o.size} {o.colour} {o.shape}"
    elif form == 1:
        words = f"{o.colour} {o.size} {o.shape}"
    elif form == 2:
        words = f"{o.shape} which is {o.size} and {o.colour}"
    elif form == 3:
        words = f"{o.colour} {o.shape} of {o.size} size"
    elif form == 4:
        words = f"{o.size} {o.shape} coloured {o.colour}"
    else:
        words = f"{o.shape}, {o.colour} and {o.size},"
    return f"the {words}" if definite else f"{_article_for(words)} {words}"


def _rich_group(objs: list[SceneObject], rng: random.Random) -> str:
    parts = []
    for (size, colour, shape), c in count_groups(objs).items():
        if c == 1:
            parts.append(_rich_noun(SceneObject(shape, colour, size, 0, 0, 0, 0), rng).rstrip(","))
        elif rng.random() < 0.5:
            parts.append(f"{NUMBER_WORDS[c]} {_plural(shape)} which are {size} and {colour}")
        else:
            parts.append(f"{NUMBER_WORDS[c]} {colour} {size} {_plural(shape)}")
    rng.shuffle(parts)
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + rng.choice(_JOIN) + parts[-1]


def _rich_place(o: SceneObject, rng: random.Random) -> str:
    if o.row == 1 and o.col == 1:
        return rng.choice(("in the center", "at the center", "right in the center"))
    if o.row == 1:
        side = COLS[o.col]
        return rng.choice((f"on the {side} side", f"toward the {side}", f"at the {side}"))
    if o.col == 1:
        return rng.choice((f"toward the {ROWS[o.row]}", f"at the {ROWS[o.row]} of the image",
                           f"on the {ROWS[o.row]}"))
    return rng.choice((f"at the {ROWS[o.row]} {COLS[o.col]}", f"in the {ROWS[o.row]} {COLS[o.col]} corner",
                       f"in the {COLS[o.col]} {ROWS[o.row]} corner"))


def make_rich_caption(scene: Scene, rng: random.Random) -> str:
    """Another description of ``scene`` from a wider grammar than ``make_caption``'s (same concept words;
    relations stated either way round, clauses in either order, attributes around the noun)."""
    objs = list(scene.objects)
    if not objs:
        raise ValueError("a scene without objects has no caption")
    bg = rng.choice(("", "", f" on a {scene.background} background", f" over a {scene.background} background",
                     f", the background is {scene.background}"))
    if len(objs) == 1:
        o = objs[0]
        frame = rng.randrange(4)
        if frame == 0:
            return _tidy(f"{rng.choice(_OPENERS)} {_rich_noun(o, rng)} {_rich_place(o, rng)}{bg}")
        if frame == 1:
            return _tidy(f"{_rich_place(o, rng)} {rng.choice(_VERBS)} {_rich_noun(o, rng)}{bg}")
        if frame == 2:
            return _tidy(f"one shape{bg}: {_rich_noun(o, rng)} {_rich_place(o, rng)}")
        return _tidy(f"{_rich_noun(o, rng, definite=True)} {rng.choice(_VERBS)} {_rich_place(o, rng)}{bg}")
    a, b = rng.sample(objs, 2)
    rel = relation(a, b)
    others = [o for o in objs if o is not a and o is not b]
    n_word = NUMBER_WORDS[len(objs)]
    if rng.random() < 0.5:  # the same fact the other way round: "b is to the right of a"
        a, b, rel = b, a, _CONVERSE[rel]
    verb = rng.choice(_VERBS)
    frame = rng.randrange(5)
    if frame == 0:
        rest = f"; the scene also contains {_rich_group(others, rng)}" if others else ""
        return _tidy(f"{_rich_noun(a, rng)} {verb} {rel} {_rich_noun(b, rng, definite=True)}{rest}{bg}")
    if frame == 1:
        rest = f", along with {_rich_group(others, rng)}" if others else ""
        return _tidy(f"{rel} {_rich_noun(b, rng, definite=True)} {verb} {_rich_noun(a, rng)}{rest}{bg}")
    if frame == 2:
        return _tidy(f"{n_word} shapes in all{bg}: {_rich_group(objs, rng)}. "
                     f"{_rich_noun(a, rng, definite=True)} {verb} {rel} {_rich_noun(b, rng, definite=True)}")
    if frame == 3:
        return _tidy(f"{rng.choice(_OPENERS)} {_rich_group(objs, rng)}{bg}; "
                     f"{_rich_noun(a, rng, definite=True)} {verb} {rel} {_rich_noun(b, rng, definite=True)}")
    return _tidy(f"{n_word} objects are drawn{bg}: {_rich_group(objs, rng)}, and "
                 f"{_rich_noun(a, rng, definite=True)} {verb} {rel} {_rich_noun(b, rng, definite=True)}")


def _tidy(text: str) -> str:
    """No comma before other punctuation or at the end (left by the "a circle, small and red," form)."""
    return re.sub(r",\s*([,;.:])", r"\1", text).rstrip(",")


# ------------------------------------------------------------------------------------------ downstream


def _count(scene: Scene, **attrs: str) -> int:
    return sum(all(getattr(o, k) == v for k, v in attrs.items()) for o in scene.objects)


def vqa_questions(scene: Scene, rng: random.Random, k: int) -> list[tuple[str, str, str, str]]:
    """(question, answer, question_type, answer_type) tuples answerable from the scene graph."""
    out: list[tuple[str, str, str, str]] = []
    for _ in range(k * 3):
        if len(out) >= k:
            break
        kind = rng.randrange(5)
        if kind == 0:
            shape = rng.choice(SHAPES)
            q = (f"how many {_plural(shape)} are there?", str(_count(scene, shape=shape)), "how many",
                 "number")
        elif kind == 1:
            q = ("how many objects are there?", str(len(scene.objects)), "how many", "number")
        elif kind == 2:
            unique = [o for o in scene.objects if _count(scene, shape=o.shape) == 1]
            if not unique:
                continue
            o = rng.choice(unique)
            q = (f"what color is the {o.shape}?", o.colour, "what color is the", "other")
        elif kind == 3:
            colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
            if rng.random() < 0.5:  # balance yes/no: half the time ask about an object that is there
                o = rng.choice(scene.objects)
                colour, shape = o.colour, o.shape
            ans = "yes" if _count(scene, colour=colour, shape=shape) else "no"
            q = (f"is there a {colour} {shape}?", ans, "is there a", "yes/no")
        else:
            if len(scene.objects) < 2:
                continue
            a, b = rng.sample(list(scene.objects), 2)
            asked = rng.choice(["to the left of", "to the right of", "above", "below"])
            ans = "yes" if relation(a, b) == asked else "no"
            q = (f"is the {a.colour} {a.shape} {asked} the {b.colour} {b.shape}?", ans, "is the", "yes/no")
        if q[0] not in {x[0] for x in out}:
            out.append(q)
    return out


def nlvr2_statement(left: Scene, right: Scene, rng: random.Random, want: bool) -> tuple[str, bool]:
    """A statement about an image pair whose truth is computed from the scene graphs; tries for ``want``."""
    best: tuple[str, bool] | None = None
    for _ in range(40):
        kind = rng.randrange(4)
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        if kind == 0:
            side, sc = rng.choice([("left", left), ("right", right)])
            n = rng.randint(0, 3)
            s = f"the {side} image contains exactly {NUMBER_WORDS[n]} {_plural(shape)}"
            truth = _count(sc, shape=shape) == n
        elif kind == 1:
            n = rng.randint(1, 5)
            s = f"there are {n} {_plural(shape)} in total"
            truth = _count(left, shape=shape) + _count(right, shape=shape) == n
        elif kind == 2:
            s = f"both images contain a {colour} object"
            truth = _count(left, colour=colour) > 0 and _count(right, colour=colour) > 0
        else:
            s = f"one image contains a {colour} {shape} and the other does not"
            in_left = _count(left, colour=colour, shape=shape) > 0
            truth = in_left != (_count(right, colour=colour, shape=shape) > 0)
        best = (s, truth)
        if truth == want:
            return s, truth
    assert best is not None
    return best


def snli_hypotheses(scene: Scene, rng: random.Random) -> list[tuple[str, str]]:
    """One entailment, one contradiction and one neutral hypothesis for the scene."""
    o = rng.choice(scene.objects)
    entail = rng.choice(
        [f"there is a {o.colour} {o.shape}", f"the image shows {len(scene.objects)} shapes",
         f"a {o.size} {o.shape} is visible"]
    )
    absent = [c for c in COLOURS if _count(scene, colour=c, shape=o.shape) == 0]
    if absent and rng.random() < 0.5:
        contra = f"the only {o.shape} in the picture is {rng.choice(absent)}"
    else:
        wrong = len(scene.objects) % 4 + 1  # always differs from the true count (1..4)
        contra = f"the image shows exactly {NUMBER_WORDS[wrong]} shapes"
    neutral = rng.choice(
        [
            f"the {o.colour} {o.shape} is made of plastic",
            f"someone drew the {o.shape} by hand yesterday",
            f"the {o.colour} {o.shape} is heavier than it looks",
            "the picture was made for a children's book",
        ]
    )
    return [(entail, "entailment"), (contra, "contradiction"), (neutral, "neutral")]


# ----------------------------------------------------------------------------------------------- writer


class _SceneStream:
    """Scene i of a named stream: its own RNG, so any scene can be regenerated independently."""

    def __init__(self, seed: int, name: str, noise_prob: float, size: int) -> None:
        self.seed, self.name, self.noise_prob, self.size = seed, name, noise_prob, size

    def rng(self, i: int) -> random.Random:
        return random.Random(f"{self.seed}/{self.name}/{i}")

    def scene(self, i: int) -> tuple[Scene, random.Random]:
        rng = self.rng(i)
        return sample_scene(rng, self.noise_prob), rng


def _noise_seed(seed: int, name: str, i: int) -> int:
    return (seed * 1_000_003 + sum(map(ord, name)) * 7919 + i) & 0xFFFFFFFF


def _write_pairs(
    fs: Any, root: str, stream: _SceneStream, count: int, cfg: SynthConfig, exclude: set[tuple] | None,
    prefix: str,
) -> tuple[dict[str, Any], set[tuple]]:
    spp = cfg.samples_per_shard or max(1, min(1000, math.ceil(count / 16)))
    writer = ShardWriter(
        fs, root, spp, writer_settings={"source": "synthetic", "seed": cfg.seed, "image_size": cfg.image_size,
                                        "stream": stream.name, "jpeg_quality": cfg.jpeg_quality},
    )
    signatures: set[tuple] = set()
    i = written = 0
    while written < count:
        scene, rng = stream.scene(i)
        i += 1
        sig = scene.signature()
        if exclude is not None and sig in exclude:
            continue  # held-out scenes must never have been seen in pre-training
        signatures.add(sig)
        img = render_scene(scene, cfg.image_size, _noise_seed(cfg.seed, stream.name, i))
        caption = make_caption(scene, rng)
        key = f"{prefix}{written:08d}"
        meta = {"source": f"synthetic:{stream.name}:{i - 1}", "width": img.width, "height": img.height,
                "scene": scene.to_dict()}
        if cfg.captions_per_scene > 1:  # their own RNG: the txt caption and the image stay as with one
            crng = random.Random(f"{cfg.seed}/{stream.name}/{i - 1}/captions")
            meta["captions"] = [make_rich_caption(scene, crng) for _ in range(cfg.captions_per_scene - 1)]
        writer.add(ShardSample(key, encode_jpeg(img, cfg.jpeg_quality), caption, meta))
        written += 1
    return writer.close(), signatures


def _save_image(fs: Any, path: str, img: Image.Image, quality: int) -> None:
    with fs.open(path, "wb") as f:  # plain write: task files are written after images, marker last
        f.write(encode_jpeg(img, quality))


def _write_jsonl(fs: Any, path: str, rows: list[dict[str, Any]]) -> None:
    with fs.open(path, "wb") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows).encode())


def _downstream(fs: Any, root: str, cfg: SynthConfig) -> dict[str, Any]:
    img_dir = join(root, "images")
    for sub in ("images", "vqa", "nlvr2", "snli_ve", "retrieval"):
        fs.makedirs(join(root, sub), exist_ok=True)
    out: dict[str, Any] = {"images_dir": img_dir}

    # VQA v2: questions + annotations, COCO-style image names.
    stream = _SceneStream(cfg.seed, "vqa", cfg.noise_background_prob, cfg.image_size)
    qid = 0
    for split, n in zip(("train", "val"), cfg.vqa_images, strict=True):
        questions, annotations = [], []
        for j in range(n):
            image_id = (0 if split == "train" else 500_000) + j + 1
            scene, rng = stream.scene(image_id)
            _save_image(fs, join(img_dir, f"COCO_{split}2014_{image_id:012d}.jpg"),
                        render_scene(scene, cfg.image_size, _noise_seed(cfg.seed, "vqa", image_id)),
                        cfg.jpeg_quality)
            for q, a, qtype, atype in vqa_questions(scene, rng, cfg.vqa_questions_per_image):
                qid += 1
                questions.append({"image_id": image_id, "question": q, "question_id": qid})
                annotations.append({
                    "question_id": qid, "image_id": image_id, "question_type": qtype, "answer_type": atype,
                    "multiple_choice_answer": a,
                    "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                                for k in range(10)],
                })
        sub = f"{split}2014"
        qpath = join(root, "vqa", f"{split}_questions.json")
        apath = join(root, "vqa", f"{split}_annotations.json")
        write_json(fs, qpath, {"info": {"description": "SOHO synthetic VQA"}, "task_type": "Open-Ended",
                               "data_type": "mscoco", "data_subtype": sub, "license": {},
                               "questions": questions})
        write_json(fs, apath, {"info": {"description": "SOHO synthetic VQA"}, "data_type": "mscoco",
                               "data_subtype": sub, "license": {}, "annotations": annotations})
        out[f"vqa_{split}_questions"], out[f"vqa_{split}_annotations"] = qpath, apath
        out[f"vqa_{split}_count"] = len(questions)

    # NLVR2: identifier {split}-{n}-{set}-{sentence}; images {split}-{n}-{set}-img0/img1.
    stream = _SceneStream(cfg.seed, "nlvr2", cfg.noise_background_prob, cfg.image_size)
    for split, n in zip(("train", "dev"), cfg.nlvr2_pairs, strict=True):
        rows = []
        for j in range(n):
            base = (0 if split == "train" else 100_000) + 2 * j
            left, rng = stream.scene(base)
            right, _ = stream.scene(base + 1)
            stem = f"{split}-{j}-0"
            for side, sc, idx in (("img0", left, base), ("img1", right, base + 1)):
                _save_image(fs, join(img_dir, f"{stem}-{side}.jpg"),
                            render_scene(sc, cfg.image_size, _noise_seed(cfg.seed, "nlvr2", idx)),
                            cfg.jpeg_quality)
            sentence, truth = nlvr2_statement(left, right, rng, want=(j % 2 == 0))
            rows.append({"identifier": f"{stem}-0", "sentence": sentence,
                         "label": "True" if truth else "False",
                         "left_url": f"images/{stem}-img0.jpg", "right_url": f"images/{stem}-img1.jpg"})
        path = join(root, "nlvr2", f"{split}.jsonl")
        _write_jsonl(fs, path, rows)
        out[f"nlvr2_{split}"], out[f"nlvr2_{split}_count"] = path, len(rows)

    # SNLI-VE: Flickr30K-style numeric image ids, premise caption + hypothesis + gold label.
    stream = _SceneStream(cfg.seed, "snli_ve", cfg.noise_background_prob, cfg.image_size)
    for split, n in zip(("train", "dev"), cfg.snli_ve_images, strict=True):
        rows = []
        for j in range(n):
            image_id = (1_000_000 if split == "train" else 2_000_000) + j
            scene, rng = stream.scene(image_id)
            _save_image(fs, join(img_dir, f"{image_id}.jpg"),
                        render_scene(scene, cfg.image_size, _noise_seed(cfg.seed, "snli_ve", image_id)),
                        cfg.jpeg_quality)
            premise = make_caption(scene, rng)
            for h, (hyp, label) in enumerate(snli_hypotheses(scene, rng)):
                rows.append({"Flickr30K_ID": str(image_id), "Flikr30kID": f"{image_id}.jpg",
                             "sentence1": premise,
                             "sentence2": hyp, "gold_label": label, "pairID": f"{image_id}#0r{h}",
                             "captionID": f"{image_id}.jpg#0"})
        path = join(root, "snli_ve", f"{split}.jsonl")
        _write_jsonl(fs, path, rows)
        out[f"snli_ve_{split}"], out[f"snli_ve_{split}_count"] = path, len(rows)

    # Karpathy-style retrieval split: several captions per image.
    stream = _SceneStream(cfg.seed, "retrieval", cfg.noise_background_prob, cfg.image_size)
    images, sentid = [], 0
    counts = cfg.retrieval_images  # train, val, test
    splits = ["train"] * counts[0] + ["val"] * counts[1] + ["test"] * counts[2]
    for imgid, split in enumerate(splits):
        scene, rng = stream.scene(imgid)
        fname = f"retrieval_{imgid:06d}.jpg"
        _save_image(fs, join(img_dir, fname),
                    render_scene(scene, cfg.image_size, _noise_seed(cfg.seed, "retrieval", imgid)),
                    cfg.jpeg_quality)
        sents = []
        for _ in range(cfg.retrieval_captions_per_image):
            raw = make_caption(scene, rng)
            sents.append({"raw": raw, "tokens": raw.replace(",", " ").replace(";", " ").replace(":", " ")
                          .replace(".", " ").split(), "imgid": imgid, "sentid": sentid})
            sentid += 1
        images.append({"filename": fname, "filepath": "images", "imgid": imgid, "cocoid": imgid,
                       "split": split, "sentences": sents, "sentids": [s["sentid"] for s in sents]})
    path = join(root, "retrieval", "dataset_synth.json")
    write_json(fs, path, {"dataset": "synth", "images": images})
    out["retrieval"], out["retrieval_count"] = path, len(images)
    return out


def cache_name(pairs: int, seed: int, heldout: int = 0, captions: int = 1) -> str:
    """The folder name, in a local cache, of the synthetic data that ``make_synthetic(out, num=pairs,
    seed=seed, heldout=heldout)`` writes (with ``SynthConfig(captions_per_scene=captions)``):
    ``synthetic-v{SYNTHETIC_CACHE_VERSION}-n{pairs}-s{seed}``, with ``-heldout{heldout}`` when there is a
    held-out split and ``-c{captions}`` with more than one caption per scene. One name per (version, pairs,
    seed, held-out, captions) so that concurrent runs with other settings never share (or rewrite) one
    folder."""
    for name, value, low in (("pairs", pairs, 1), ("seed", seed, 0), ("heldout", heldout, 0),
                             ("captions", captions, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"cache_name: {name} must be an integer >= {low} (got {value!r})")
    name = f"synthetic-v{SYNTHETIC_CACHE_VERSION}-n{pairs}-s{seed}"
    if heldout:
        name += f"-heldout{heldout}"
    return f"{name}-c{captions}" if captions > 1 else name


def make_synthetic(
    output: str,
    num: int,
    seed: int = 0,
    heldout: int = 0,
    image_size: int = 128,
    config: SynthConfig | None = None,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write synthetic pre-training shards, held-out shards and downstream task files under ``output``.

    Idempotent: if ``{output}/synth_done.json`` records the same configuration, nothing is rewritten and
    the recorded result is returned. Returns paths (``pretrain``, ``pretrain_manifest``, ``heldout``,
    ``heldout_manifest``, ``downstream`` and one entry per task file) and counts.
    """
    cfg = config or SynthConfig()
    cfg = SynthConfig(**{**asdict(cfg), "num": num, "seed": seed, "heldout": heldout,
                         "image_size": image_size})
    if num < 1:
        raise ValueError(f"num must be ≥ 1, got {num}")
    if cfg.captions_per_scene < 1:
        raise ValueError(f"SynthConfig.captions_per_scene must be ≥ 1, got {cfg.captions_per_scene}")
    fs, root = get_fs(output, storage_options)
    marker = join(root, DONE_MARKER)
    cfg_dict = json.loads(json.dumps(asdict(cfg)))  # tuples → lists, as stored in the marker
    if fs.exists(marker):
        done = read_json(fs, marker)
        if done.get("config") == cfg_dict:
            logger.info("synthetic data already complete at %s", output)
            return done["result"]
    t0 = time.time()
    fs.makedirs(root, exist_ok=True)
    stream = _SceneStream(seed, "pretrain", cfg.noise_background_prob, image_size)
    manifest, sigs = _write_pairs(fs, join(root, "pretrain"), stream, num, cfg, None, "p")
    base = output.rstrip("/")
    result: dict[str, Any] = {
        "pretrain": f"{base}/pretrain",
        "pretrain_manifest": f"{base}/pretrain/manifest.json",
        "pretrain_count": manifest["totals"]["samples"],
    }
    if heldout > 0:
        hstream = _SceneStream(seed, "heldout", cfg.noise_background_prob, image_size)
        hman, _ = _write_pairs(fs, join(root, "heldout"), hstream, heldout, cfg, sigs, "h")
        result.update({"heldout": f"{base}/heldout", "heldout_manifest": f"{base}/heldout/manifest.json",
                       "heldout_count": hman["totals"]["samples"]})
    ds = _downstream(fs, join(root, "downstream"), cfg)
    prefix_len = len(root.rstrip("/"))
    result["downstream"] = f"{base}/downstream"
    for k, v in ds.items():
        result[k] = f"{base}{v[prefix_len:]}" if isinstance(v, str) else v
    write_json(fs, marker, {"config": cfg_dict, "result": result})
    logger.info("synthetic data: %d pairs (+%d held out) in %.1fs at %s", num, heldout, time.time() - t0,
                output)
    return result


def add_cli_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num", type=int, required=True, help="number of pre-training pairs")
    p.add_argument("--output", required=True, help="output URL or path (file://, s3://, memory://)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heldout", type=int, default=0,
                   help="held-out pairs from scenes never used in pre-training")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--samples-per-shard", type=int, default=None)
    p.add_argument("--captions-per-scene", type=int, default=1,
                   help="captions per pair: the txt one plus N-1 from a richer grammar in the json's "
                        "captions list (train with --caption-choice any)")


def run_cli(args: argparse.Namespace, storage_options: dict[str, Any]) -> int:
    cfg = SynthConfig(samples_per_shard=args.samples_per_shard, captions_per_scene=args.captions_per_scene)
    result = make_synthetic(args.output, args.num, args.seed, args.heldout, args.image_size, cfg,
                            storage_options)
    print(json.dumps(result, indent=1))
    return 0
