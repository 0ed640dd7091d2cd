"""Readers for the downstream datasets' real file formats → typed task examples.

Formats (the synthetic files from ``python -m data_pipeline synth`` use the same ones):
- VQA v2: ``*_questions.json`` {"data_subtype": "train2014", "questions": [{image_id, question, question_id}]}
  and ``*_annotations.json`` {"annotations": [{question_id, image_id, answers: [{answer, ...}] × 10,
  multiple_choice_answer, ...}]}; images ``COCO_{data_subtype}_{image_id:012d}.jpg``.
- NLVR2: JSONL, one {identifier "split-n-set-k", sentence, label "True"/"False", [directory]} per line;
  the two images are ``{split-n-set}-img0`` / ``-img1`` (.png in the release, .jpg in ours), under
  ``{directory}/`` for the train split.
- SNLI-VE: JSONL, {Flickr30K_ID (or Flikr30kID "123.jpg"), sentence2 (hypothesis), gold_label, pairID, ...}.
- Karpathy retrieval split (COCO / Flickr30K): {"images": [{filename, [filepath], split, imgid,
  sentences: [{raw, tokens}]}]}.

Readers take fsspec URLs or paths, never load an image (that happens per batch), and name the file and
line/record of any malformed input. This module must not import ``soho``.
"""

from __future__ import annotations

import json
import logging
import posixpath
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec

from data_pipeline.loader import Collator, DecodedSample, LoaderConfig, decode_sample
from data_pipeline.tarstream import RawSample

logger = logging.getLogger(__name__)

__all__ = [
    "VQAExample",
    "NLVR2Example",
    "SNLIVEExample",
    "RetrievalImage",
    "SNLI_VE_LABELS",
    "read_vqa",
    "read_nlvr2",
    "read_snli_ve",
    "read_karpathy",
    "flatten_captions",
    "TaskDataConfig",
    "TaskCollator",
    "collate_vqa",
    "collate_nlvr2",
    "collate_snli_ve",
    "collate_retrieval_pairs",
]

SNLI_VE_LABELS: tuple[str, ...] = ("entailment", "neutral", "contradiction")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


class DownstreamFormatError(ValueError):
    """A downstream annotation file does not follow its dataset's format; the message names the input."""


@dataclass(frozen=True)
class VQAExample:
    question_id: int
    image_id: int
    image_path: str
    question: str
    answers: tuple[str, ...]  # the human answers (10 in VQA v2); empty for test splits without annotations
    multiple_choice_answer: str | None
    answer_type: str | None = None  # "yes/no" | "number" | "other" (annotations), for per-type accuracy


@dataclass(frozen=True)
class NLVR2Example:
    identifier: str
    sentence: str
    label: bool
    image_paths: tuple[str, str]  # (left, right)


@dataclass(frozen=True)
class SNLIVEExample:
    pair_id: str
    image_id: str
    image_path: str
    hypothesis: str
    label: int  # index into SNLI_VE_LABELS


@dataclass(frozen=True)
class RetrievalImage:
    image_id: int
    image_path: str
    split: str
    captions: tuple[str, ...]


def _read_text(url: str, storage_options: dict[str, Any] | None) -> str:
    try:
        with fsspec.open(url, "rb", **(storage_options or {})) as f:
            return f.read().decode("utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"downstream annotation file not found: {url}") from None


def _read_json(url: str, storage_options: dict[str, Any] | None) -> Any:
    try:
        return json.loads(_read_text(url, storage_options))
    except json.JSONDecodeError as e:
        raise DownstreamFormatError(f"{url}: not valid JSON ({e})") from None


def _iter_jsonl(url: str, storage_options: dict[str, Any] | None) -> Iterator[tuple[int, dict[str, Any]]]:
    for lineno, line in enumerate(_read_text(url, storage_options).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DownstreamFormatError(f"{url}:{lineno}: not valid JSON ({e})") from None
        if not isinstance(record, dict):
            raise DownstreamFormatError(
                f"{url}:{lineno}: expected a JSON object, got {type(record).__name__}"
            )
        yield lineno, record


def _field(record: dict[str, Any], key: str, where: str) -> Any:
    if key not in record:
        raise DownstreamFormatError(f"{where}: missing field {key!r} (has {sorted(record)[:8]})")
    return record[key]


def _join(root: str, *parts: str) -> str:
    return posixpath.join(root.rstrip("/"), *parts) if root else posixpath.join(*parts)


def read_vqa(
    questions_url: str,
    image_dir: str,
    annotations_url: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> list[VQAExample]:
    """VQA v2 questions (+ annotations when given) → examples in the questions file's order."""
    questions = _read_json(questions_url, storage_options)
    if not isinstance(questions, dict) or "questions" not in questions:
        raise DownstreamFormatError(
            f"{questions_url}: expected a VQA questions object with a 'questions' list"
        )
    subtype = questions.get("data_subtype")
    if not subtype:
        raise DownstreamFormatError(
            f"{questions_url}: missing 'data_subtype' (e.g. 'train2014') for image names"
        )
    answers: dict[int, tuple[tuple[str, ...], str | None, str | None]] = {}
    if annotations_url is not None:
        ann = _read_json(annotations_url, storage_options)
        if not isinstance(ann, dict) or "annotations" not in ann:
            raise DownstreamFormatError(f"{annotations_url}: expected an object with an 'annotations' list")
        for i, a in enumerate(ann["annotations"]):
            where = f"{annotations_url}: annotations[{i}]"
            human = tuple(str(_field(x, "answer", where)) for x in _field(a, "answers", where))
            answers[int(_field(a, "question_id", where))] = (human, a.get("multiple_choice_answer"),
                                                             a.get("answer_type"))
    out = []
    for i, q in enumerate(questions["questions"]):
        where = f"{questions_url}: questions[{i}]"
        qid, image_id = int(_field(q, "question_id", where)), int(_field(q, "image_id", where))
        if annotations_url is not None and qid not in answers:
            raise DownstreamFormatError(f"{where}: question_id {qid} has no entry in {annotations_url}")
        human, mc, answer_type = answers.get(qid, ((), None, None))
        out.append(
            VQAExample(
                question_id=qid,
                image_id=image_id,
                image_path=_join(image_dir, f"COCO_{subtype}_{image_id:012d}.jpg"),
                question=str(_field(q, "question", where)),
                answers=human,
                multiple_choice_answer=mc,
                answer_type=answer_type,
            )
        )
    logger.info("read %d VQA questions from %s", len(out), questions_url)
    return out


def _list_images(image_dir: str, storage_options: dict[str, Any] | None) -> dict[str, str]:
    """basename → path for every image under image_dir (one listing instead of a stat per example)."""
    fs, root = fsspec.core.url_to_fs(image_dir, **(storage_options or {}))
    if not fs.isdir(root):
        raise FileNotFoundError(f"image directory not found: {image_dir}")
    protocol = fs.protocol[0] if isinstance(fs.protocol, tuple | list) else fs.protocol
    prefix = "" if protocol in ("file", "local") else f"{protocol}://"
    return {posixpath.basename(p): prefix + p for p in fs.find(root) if p.lower().endswith(IMAGE_EXTENSIONS)}


def read_nlvr2(
    jsonl_url: str, image_dir: str, storage_options: dict[str, Any] | None = None
) -> list[NLVR2Example]:
    """NLVR2 JSONL → examples; images are found by name anywhere under image_dir (the release nests the
    train split in numbered ``directory`` folders)."""
    images = _list_images(image_dir, storage_options)
    out = []
    for lineno, r in _iter_jsonl(jsonl_url, storage_options):
        where = f"{jsonl_url}:{lineno}"
        identifier = str(_field(r, "identifier", where))
        label = str(_field(r, "label", where))
        if label not in ("True", "False"):
            raise DownstreamFormatError(f"{where}: label must be 'True' or 'False', got {label!r}")
        stem = identifier.rsplit("-", 1)[0]  # "train-10171-0-0" → "train-10171-0"
        paths = []
        for side in ("img0", "img1"):
            found = next(
                (images[n] for n in (f"{stem}-{side}{e}" for e in IMAGE_EXTENSIONS) if n in images), None
            )
            if found is None:
                raise FileNotFoundError(f"{where}: image {stem}-{side}.(jpg|png) not found under {image_dir}")
            paths.append(found)
        out.append(
            NLVR2Example(identifier, str(_field(r, "sentence", where)), label == "True", (paths[0], paths[1]))
        )
    logger.info("read %d NLVR2 statements from %s", len(out), jsonl_url)
    return out


def read_snli_ve(
    jsonl_url: str, image_dir: str, storage_options: dict[str, Any] | None = None
) -> list[SNLIVEExample]:
    """SNLI-VE JSONL → examples. Pairs whose gold label is '-' (annotators disagreed; SNLI keeps them,
    SNLI-VE's splits should not contain them) are skipped and counted in the log."""
    out, skipped = [], 0
    for lineno, r in _iter_jsonl(jsonl_url, storage_options):
        where = f"{jsonl_url}:{lineno}"
        label = str(_field(r, "gold_label", where))
        if label == "-":
            skipped += 1
            continue
        if label not in SNLI_VE_LABELS:
            raise DownstreamFormatError(f"{where}: gold_label must be one of {SNLI_VE_LABELS}, got {label!r}")
        if "Flickr30K_ID" in r:
            image_id = str(r["Flickr30K_ID"])
        elif "Flikr30kID" in r:  # the release's own (misspelt) key holds the file name
            image_id = str(r["Flikr30kID"]).rsplit(".", 1)[0]
        else:
            raise DownstreamFormatError(f"{where}: missing field 'Flickr30K_ID' / 'Flikr30kID'")
        out.append(
            SNLIVEExample(
                pair_id=str(r.get("pairID", lineno)),
                image_id=image_id,
                image_path=_join(image_dir, f"{image_id}.jpg"),
                hypothesis=str(_field(r, "sentence2", where)),
                label=SNLI_VE_LABELS.index(label),
            )
        )
    if skipped:
        logger.warning("%s: skipped %d pairs without a gold label ('-')", jsonl_url, skipped)
    logger.info("read %d SNLI-VE pairs from %s", len(out), jsonl_url)
    return out


def read_karpathy(
    json_url: str,
    image_dir: str,
    split: str | tuple[str, ...] = "test",
    storage_options: dict[str, Any] | None = None,
) -> list[RetrievalImage]:
    """Karpathy split JSON → the images of `split` (e.g. "test", or ("train", "restval")) with captions.

    COCO entries carry a ``filepath`` (train2014/val2014) joined under image_dir; Flickr30K's do not.
    """
    splits = (split,) if isinstance(split, str) else tuple(split)
    data = _read_json(json_url, storage_options)
    if not isinstance(data, dict) or "images" not in data:
        raise DownstreamFormatError(f"{json_url}: expected an object with an 'images' list")
    out = []
    for i, im in enumerate(data["images"]):
        where = f"{json_url}: images[{i}]"
        if str(_field(im, "split", where)) not in splits:
            continue
        captions = []
        for j, s in enumerate(_field(im, "sentences", where)):
            raw = s.get("raw") if isinstance(s, dict) else None
            if raw is None and isinstance(s, dict) and "tokens" in s:
                raw = " ".join(s["tokens"])
            if not raw:
                raise DownstreamFormatError(f"{where}.sentences[{j}]: no 'raw' caption or 'tokens'")
            captions.append(str(raw))
        if not captions:
            raise DownstreamFormatError(f"{where}: image has no sentences")
        parts = [im["filepath"]] if im.get("filepath") else []
        image_id = im.get("imgid", im.get("cocoid", i))
        out.append(
            RetrievalImage(
                int(image_id),
                _join(image_dir, *parts, str(_field(im, "filename", where))),
                im["split"],
                tuple(captions),
            )
        )
    if not out:
        raise DownstreamFormatError(f"{json_url}: no images in split {splits}")
    logger.info(
        "read %d images (%d captions) of split %s from %s",
        len(out),
        sum(len(x.captions) for x in out),
        splits,
        json_url,
    )
    return out


def flatten_captions(
    images: list[RetrievalImage], max_captions: int | None = None
) -> tuple[list[str], list[int]]:
    """(captions, image index of each caption) in image order; COCO has 5 per image, some images 6-7, so
    `max_captions` trims to the first N as the standard 5K/1K protocol does."""
    texts, owner = [], []
    for idx, im in enumerate(images):
        caps = im.captions if max_captions is None else im.captions[:max_captions]
        texts.extend(caps)
        owner.extend([idx] * len(caps))
    return texts, owner


# ------------------------------------------------------------------------------ images → task batches
# Images go through the pre-training loader's own decode (resize the longest side to `max_image_side`, RGB)
# and collation (uint8 pixels, bottom/right padding to `pad_multiple`, tokenization; the model's encoder
# applies the ImageNet normalisation on its device), so a fine-tuned model sees exactly the input
# statistics it was pre-trained on.


@dataclass
class TaskDataConfig:
    """Image/text geometry of task batches; use the same values as the pre-training run's loader."""

    max_image_side: int = 128
    pad_multiple: int = 32  # the grid encoder's total stride
    max_text_len: int = 40
    tokenizer: str | None = None  # None = packaged MiniLM vocab (bert-base-uncased WordPiece)
    storage_options: dict[str, Any] = field(default_factory=dict)
    image_cache_size: int = 4096  # decoded images kept in memory (VQA asks several questions per image)


class TaskCollator:
    """Reads and decodes images by path (cached), then builds the pre-training batch dict plus task keys."""

    def __init__(self, cfg: TaskDataConfig) -> None:
        self.cfg = cfg
        self._collate = Collator(
            LoaderConfig(
                urls=[],
                max_image_side=cfg.max_image_side,
                pad_multiple=cfg.pad_multiple,
                max_text_len=cfg.max_text_len,
                tokenizer=cfg.tokenizer,
            )
        )
        self.tokenizer = self._collate.tokenizer
        self._cache: OrderedDict[str, Any] = OrderedDict()

    def image(self, path: str) -> Any:
        """uint8 (h, w, 3) array of the image at `path`, decoded like a shard sample."""
        hit = self._cache.get(path)
        if hit is not None:
            self._cache.move_to_end(path)
            return hit
        try:
            with fsspec.open(path, "rb", **self.cfg.storage_options) as f:
                data = f.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"image not found: {path}") from None
        ext = posixpath.splitext(path)[1].lower().lstrip(".") or "jpg"
        decoded = decode_sample(RawSample(path, path, {ext: data, "txt": b"-"}), self.cfg.max_image_side)
        if isinstance(decoded, str):
            raise ValueError(f"image {path}: {decoded}")
        self._cache[path] = decoded.image
        if len(self._cache) > self.cfg.image_cache_size:
            self._cache.popitem(last=False)
        return decoded.image

    def batch(self, keys: list[str], image_paths: list[str], texts: list[str]) -> dict[str, Any]:
        """One row per (image, text); the loader's batch dict (pixel_values, pixel_mask, input_ids, ...)."""
        samples = [
            DecodedSample(k, self.image(p), t) for k, p, t in zip(keys, image_paths, texts, strict=True)
        ]
        return self._collate(samples)

    def images(self, image_paths: list[str]) -> dict[str, Any]:
        """Images only (retrieval encodes each image once): pixel_values (uint8), pixel_mask."""
        b = self.batch(image_paths, image_paths, [""] * len(image_paths))
        return {"pixel_values": b["pixel_values"], "pixel_mask": b["pixel_mask"]}

    def texts(self, texts: list[str]) -> dict[str, Any]:
        """Texts only: input_ids, attention_mask tokenized exactly as in the loader's collation."""
        tok = self.tokenizer(
            texts, padding="longest", truncation=True, max_length=self.cfg.max_text_len, return_tensors="pt"
        )
        return {"input_ids": tok["input_ids"].long(), "attention_mask": tok["attention_mask"].long()}


def collate_vqa(collator: TaskCollator, examples: list[VQAExample]) -> dict[str, Any]:
    """Batch + `question_ids` and the human `answers` (soft targets are built model-side from them)."""
    import torch

    batch = collator.batch([str(e.question_id) for e in examples], [e.image_path for e in examples],
                           [e.question for e in examples])  # fmt: skip
    batch["question_ids"] = torch.tensor([e.question_id for e in examples], dtype=torch.long)
    batch["answers"] = [e.answers for e in examples]
    return batch


def collate_nlvr2(collator: TaskCollator, examples: list[NLVR2Example]) -> dict[str, Any]:
    """Images interleaved (left_0, right_0, left_1, ...): pixel_values (2B, ...); text and labels (B, ...)."""
    import torch

    paths = [p for e in examples for p in e.image_paths]
    images = collator.images(paths)
    text = collator.texts([e.sentence for e in examples])
    return {**images, **text, "labels": torch.tensor([int(e.label) for e in examples], dtype=torch.long),
            "keys": [e.identifier for e in examples]}  # fmt: skip


def collate_snli_ve(collator: TaskCollator, examples: list[SNLIVEExample]) -> dict[str, Any]:
    import torch

    batch = collator.batch([e.pair_id for e in examples], [e.image_path for e in examples],
                           [e.hypothesis for e in examples])  # fmt: skip
    batch["labels"] = torch.tensor([e.label for e in examples], dtype=torch.long)
    return batch


def collate_retrieval_pairs(
    collator: TaskCollator, images: list[RetrievalImage], caption_choice: list[int]
) -> dict[str, Any]:
    """Training pairs: image i with its caption `caption_choice[i]` (modulo its caption count)."""
    texts = [im.captions[c % len(im.captions)] for im, c in zip(images, caption_choice, strict=True)]
    return collator.batch([str(im.image_id) for im in images], [im.image_path for im in images], texts)
