"""The training stream: shards → batches, deterministic and exactly resumable.

Stages (one small function or class each):

1. ``resolve_shards``   manifest.json URL, brace pattern ``dir/shards-{000000..000009}.tar`` or a list.
2. ``epoch_shards``     shuffle the shard list by (seed, epoch), split by node (rank), then by DataLoader
                        worker. Resampled mode instead draws shards with replacement, per (rank, worker),
                        forever — for multi-node runs where ranks must never run dry at different times.
3. windows              read consecutive shards of this worker's sequence until ≥ ``shuffle_buffer``
                        samples are held (raw bytes, nothing decoded), then permute them by
                        (seed, epoch, rank, worker, window start). A "block shuffle": the loader holds a
                        buffer, never the dataset, and a position is just (window start, item index), so
                        resuming re-reads one window instead of replaying the epoch.
4. ``decode_sample``    JPEG/PNG → RGB, resize so the longest side is ``max_image_side`` (both ways, aspect
                        kept; SOHO feeds whole images at a fixed scale), UTF-8 caption. No horizontal flip:
                        captions name left and right. Undecodable samples are skipped and counted.
5. ``collate``          pad the uint8 images bottom/right to a multiple of ``pad_multiple`` (pixel_mask
                        True on real pixels), tokenize "[CLS] caption [SEP] [PAD]…" (fast BERT WordPiece),
                        attention masks. No float work: the model normalises on its device
                        (``soho.encoder.normalize_pixels``). ``pin_memory``: batches come out in pinned
                        memory (for ``.to("cuda", non_blocking=True)``).

GPU decoding (``LoaderConfig.gpu_decode``, for nodes whose CPUs cannot decode fast enough): stage 4 only
reads the image header (format, size: undecodable headers are still skipped and counted) and keeps the
JPEG bytes; the batch carries ``images`` (one 1-D uint8 tensor of JPEG bytes per sample) instead of
``pixel_values``/``pixel_mask``, and the consumer calls :func:`images_to_batch` on the GPU
(``torchvision.io.decode_jpeg(device="cuda")``, resize, pad). Images that are not baseline RGB/grey JPEG
(PNG, CMYK, …) are decoded here as usual and travel as (h, w, 3) uint8 arrays in the same list.

Epochs (non-resampled): one pass over every shard; each sample is delivered exactly once per epoch across
all ranks and workers. ``LoaderConfig.epochs``: ``None`` iterates forever (epoch after epoch), ``n`` stops
once ``loader.epoch == n``. A worker's last batch of an epoch may be short unless ``drop_last``.
With ``num_workers > 0`` batches are built inside torch DataLoader workers and re-ordered round-robin by
worker in this process, so the global batch order is the same whatever the processes' timing, and
``state_dict()`` (each worker's position + whose turn is next) restores it exactly.

Changing the world size or the number of DataLoader workers (a run that lost a GPU goes on with fewer ranks,
or grows back): build the loader for the new world and call ``load_states_from(states)`` with every old
rank's ``state_dict()`` in old rank order. Epoch mode: the rest of the interrupted pass is split over the
new streams — partly read windows are re-read and re-shuffled exactly as their old stream did and continue
after the items it delivered; shards no old stream started are dealt round-robin in pass order — so every
sample of the pass is delivered exactly once (``drop_last`` and undecodable samples aside); later epochs
are the new world's own. Resampled mode: every stream is reseeded (the reshape generation is part of its
seed key). Semantics, exceptions and cost: ``data_pipeline/assignment.py``.

Verification (``LoaderConfig.verify``, on by default; nothing changed after sharding is trained on silently):

* Per sample, before it enters a window: the sha256 of the ``jpg`` and of the ``txt`` bytes (already in
  memory, no second read) against ``sha256`` / ``txt_sha256`` in the sample's ``.json``, as the writer
  recorded them. A mismatch drops the sample (``sample_hash_mismatch``). In a shard listed by a
  ``soho-webdataset`` manifest every sample must carry ``sha256`` (else ``sample_hash_missing``); shards
  written before ``txt_sha256`` existed have only the jpg checked. Outside our manifests (brace pattern,
  list, img2dataset output) ``sha256`` is checked only when ``txt_sha256`` marks the json as our writer's:
  img2dataset's ``sha256`` is the hash of the *downloaded* file, not of the resized jpg it stores.
  In a shard whose manifest records its sha256, the sample hashes are computed only when the shard's own
  check fails (to name the changed samples in the log and the counts): the shard's hash already covers
  every byte of its samples, and none of them is used before that verdict. (The ``sample_hash_missing``
  check still applies to each sample.)
* Per shard listed in a manifest: its size (before reading, where the stream knows it) and its sha256
  (computed as the bytes stream through the tar reader, compared after the last member) against the
  manifest. A mismatch (``shard_size_mismatch`` / ``shard_hash_mismatch``) rejects the *whole* shard: a
  window always holds whole shards, so the verdict is known before any of its samples is yielded and none
  of them is used — not even ones whose own hashes match. (If a window ever streamed part of a shard, the
  per-sample check would be what protects the samples yielded before the shard's end.) Shards from a brace
  pattern or a list have no recorded hash: only the per-sample check applies.
* A rejected shard is logged with its name and the reason and remembered (``rejected_shards()``, saved in
  ``state_dict()``); later passes skip it without reading it (unless ``verify`` is off). Each DataLoader
  worker process finds rejections in its own shards; they reach this process with the batches, and the
  next pass's workers start with all of them. Skipping a known-bad shard and reading-then-rejecting it
  give the same window (no samples, the same position), so shard assignment, windows and batches are a
  function of the shard bytes alone (while they do not change during the run): what this process happens
  to know never changes the batch sequence, and resume stays exact (only I/O is saved). Ranks do not share
  what they found; the split of shards by rank and worker is that of the full list, as without
  verification. A resampled stream's worker keeps its own findings only.
  Counts are per detection: a shard is counted again when another process reads it.

Failing loudly (whether or not ``verify`` is on): a shard "gives nothing" when it yields no sample that
passes the checks (unreadable, cut before its first sample, rejected, or empty). ``max_bad_shards_in_row``
such shards in a row in one worker's sequence, or a whole pass (an epoch of this rank, begun from its start)
without one batch, raise ``DataUnreadableError`` naming the shards and their causes — instead of spinning
through empty epochs. In a DataLoader worker the error travels to this process with torch's worker
exception, at once.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import math
import os
import random
import warnings
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.io import ImageReadMode, decode_jpeg

from data_pipeline.assignment import (
    StreamPlan,
    WindowRead,
    carry_plans,
    check_old_states,
    iter_windows,
    pass_order,
    plan_to_json,
    position_after,
    resample_index,
    state_plans,
    stream_key,
    stream_sequence,
    stream_work,
)
from data_pipeline.jpeg import decode_jpeg_hwc, has_end_marker, jpeg_frame
from data_pipeline.storage import expand_braces, get_fs
from data_pipeline.tarstream import UNREADABLE_SHARD, HashingReader, RawSample, iter_tar
from data_pipeline.text_augment import TextAugment, augment_caption, vocabulary_words
from data_pipeline.tokenizer import load_tokenizer
from data_pipeline.writer import FORMAT_NAME

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # DataLoader workers fork; no nested thread pools
logger = logging.getLogger(__name__)

STATE_VERSION = 2  # 2: positions record a started window's "end"; "generation" and "plans" (reshapes)

# Reasons counted while loading (beside tarstream's truncated_tar / unsafe_member_name / unreadable_shard).
UNDECODABLE_IMAGE = "undecodable_image"
MISSING_IMAGE = "missing_image"
MISSING_CAPTION = "missing_caption"
BAD_CAPTION = "caption_not_utf8"
# Verification (see the module docstring).
SAMPLE_HASH_MISMATCH = "sample_hash_mismatch"
SAMPLE_HASH_MISSING = "sample_hash_missing"
SHARD_HASH_MISMATCH = "shard_hash_mismatch"
SHARD_SIZE_MISMATCH = "shard_size_mismatch"
MAX_NAMED = 20  # shards named in an error message


class DataUnreadableError(RuntimeError):
    """The loader cannot make progress: shard after shard gives nothing, or a whole pass gave no batch."""


@dataclass
class LoaderConfig:
    urls: str | list[str]  # manifest.json URL, brace pattern, single shard URL, or a list of shard URLs
    batch_size: int = 8
    max_image_side: int = 128
    pad_multiple: int = 32  # the grid encoder's total stride
    max_text_len: int = 40
    resampled: bool = False
    seed: int = 0
    shuffle_buffer: int = 1000  # samples held per worker for the block shuffle; ≤1 keeps shard order
    num_workers: int = 0  # torch DataLoader workers; 0 = everything in this process
    tokenizer: str | None = None  # hub name or directory; None = packaged MiniLM vocab (offline)
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec kwargs (s3 endpoint, ...)
    epochs: int | None = None  # None = endless; n = stop when loader.epoch reaches n (ignored if resampled)
    drop_last: bool = False  # drop each worker's short last batch of an epoch
    prefetch_factor: int = 2
    verify: bool = True  # check sample hashes and (manifest) shard size + sha256; see the module docstring
    max_bad_shards_in_row: int = 8  # shards in a row giving nothing (per worker) before DataUnreadableError
    pin_memory: bool = False  # batches in page-locked memory (needs CUDA), for non_blocking host→GPU copies
    gpu_decode: bool = False  # keep JPEG bytes; the consumer decodes on the GPU (images_to_batch)
    text_augment: TextAugment = field(default_factory=TextAugment)  # word-level caption noise (off)
    # "txt": the sample's txt caption. "any": one drawn per epoch (seeded, resumable) among the txt caption
    # and the strings of the json's "captions" list (COCO-style several captions per image); a sample
    # without that list keeps its txt caption.
    caption_choice: str = "txt"


CAPTION_CHOICES = ("txt", "any")


# ------------------------------------------------------------------------------------------ shard list

@dataclass(frozen=True)
class ShardRecord:
    """What a manifest recorded about one shard when it was written."""

    bytes: int | None
    sha256: str | None
    hashed_samples: bool  # a soho-webdataset manifest: every sample's json carries the jpg's sha256


def resolve_shards(urls: str | list[str], storage_options: dict[str, Any] | None = None) -> list[str]:
    """Turn the configured ``urls`` into the list of shard URLs."""
    return resolve_shard_records(urls, storage_options)[0]


def resolve_shard_records(
    urls: str | list[str], storage_options: dict[str, Any] | None = None
) -> tuple[list[str], dict[str, ShardRecord]]:
    """The shard URLs, and for those listed by a manifest what it recorded (size, sha256)."""
    if isinstance(urls, (list, tuple)):
        if not urls:
            raise ValueError("LoaderConfig.urls is an empty list")
        return [str(u) for u in urls], {}
    if urls.endswith(".json"):
        fs, path = get_fs(urls, storage_options)
        if not fs.exists(path):
            raise FileNotFoundError(f"manifest {urls} does not exist")
        with fs.open(path, "rb") as f:
            manifest = json.loads(f.read())
        if "shards" not in manifest:
            raise ValueError(f"{urls} is not a shard manifest (no 'shards' list)")
        base = urls.rsplit("/", 1)[0] if "/" in urls else "."
        ours = manifest.get("format") == FORMAT_NAME
        shards, records = [], {}
        for i, s in enumerate(manifest["shards"]):
            if not isinstance(s, dict) or not isinstance(s.get("name"), str):
                raise ValueError(f"manifest {urls}: shards[{i}] has no 'name' string: {s!r}")
            if s.get("samples", 1) <= 0:
                continue
            size, digest = s.get("bytes"), s.get("sha256")
            if size is not None and (not isinstance(size, int) or size < 0):
                raise ValueError(f"manifest {urls}: shards[{i}] ({s['name']}) has bytes={size!r}, not a size")
            if digest is not None and not (isinstance(digest, str) and len(digest) == 64):
                raise ValueError(f"manifest {urls}: shards[{i}] ({s['name']}) has sha256={digest!r}, "
                                 "not 64 hex digits")
            url = f"{base}/{s['name']}"
            shards.append(url)
            records[url] = ShardRecord(size, digest.lower() if digest else None, ours)
        if not shards:
            raise ValueError(f"manifest {urls} lists no non-empty shards")
        return shards, records
    return expand_braces(urls), {}


def epoch_shards(
    shards: list[str], seed: int, epoch: int, rank: int, world_size: int, worker: int, num_workers: int
) -> list[str]:
    """This worker's shards for one epoch: shuffled by (seed, epoch), split by node, then by worker
    (``order[rank::world_size][worker::num_workers]``; ``assignment.stream_sequence`` names the indices)."""
    order = pass_order(shards, seed, epoch)
    return [order[i] for i in stream_sequence(rank, world_size, worker, num_workers, len(order))]


def check_enough_shards(n_shards: int, world_size: int, num_workers: int, what: str) -> None:
    need = world_size * max(1, num_workers)
    if n_shards < need:
        raise ValueError(
            f"{what}: {n_shards} shard(s) < world_size {world_size} × workers {max(1, num_workers)} "
            f"= {need}; "
            "every rank and worker needs at least one shard — write more, smaller shards "
            "(--samples-per-shard), use fewer workers, or set resampled=True"
        )


# -------------------------------------------------------------------------------------- verification


def check_sample_hashes(raw: RawSample, required: bool, hash_bytes: bool = True) -> str | None:
    """None if the sample's jpg/txt bytes match the hashes its json recorded, else the reason to drop it.

    ``required``: the shard comes from one of our manifests, so the json must record the jpg's sha256.
    ``hash_bytes=False``: only that presence check (for a shard whose own sha256 is being checked: see
    ``WorkerStream._read_shard``).
    """
    if not hash_bytes and not required:
        return None  # nothing to check: not even the json needs parsing
    meta: Any = None
    if "json" in raw.members:
        try:
            meta = json.loads(raw.members["json"])
        except (ValueError, UnicodeDecodeError):
            meta = None
    if not isinstance(meta, dict):
        return SAMPLE_HASH_MISSING if required else None
    jpg_hash, txt_hash = meta.get("sha256"), meta.get("txt_sha256")
    if required and not isinstance(jpg_hash, str):
        return SAMPLE_HASH_MISSING
    if not hash_bytes:
        return None
    # Outside our manifests a json's sha256 is ours only if txt_sha256 (our writer's) is beside it.
    if isinstance(jpg_hash, str) and (required or txt_hash is not None):
        if hashlib.sha256(raw.members.get("jpg", b"")).hexdigest() != jpg_hash.lower():
            return SAMPLE_HASH_MISMATCH
    txt_digest = hashlib.sha256(raw.members.get("txt", b"")).hexdigest()
    if isinstance(txt_hash, str) and txt_digest != txt_hash.lower():
        return SAMPLE_HASH_MISMATCH
    return None


def _stream_size(f: Any) -> int | None:
    """The size of an open shard if the stream knows it without reading (local file, fsspec file)."""
    try:
        return os.fstat(f.fileno()).st_size
    except (AttributeError, OSError, io.UnsupportedOperation):
        size = getattr(f, "size", None)
        return size if isinstance(size, int) else None


def _name_shards(failures: list[tuple[str, str]]) -> str:
    """'url: cause; ...' for an error message, each shard once, at most MAX_NAMED of them."""
    seen: dict[str, str] = {}
    for url, cause in failures:
        seen.setdefault(url, cause)
    parts = [f"{u}: {c}" for u, c in list(seen.items())[:MAX_NAMED]]
    more = len(seen) - MAX_NAMED
    return "; ".join(parts) + (f"; … and {more} more" if more > 0 else "")


# ------------------------------------------------------------------------------------------ decoding


@dataclass
class DecodedSample:
    key: str
    # uint8 (h, w, 3); with gpu_decode, 1-D JPEG bytes (undecoded_sample); None once the training stream
    # has copied it into its batch buffer (ImageBatchBuilder)
    image: np.ndarray | None
    caption: str
    alternatives: tuple[str, ...] = ()  # other captions of the image (caption_choice="any")


_MAX_CAPTION_WARNINGS = 10
_caption_warnings = 0


def sample_alternatives(raw: RawSample) -> tuple[str, ...]:
    """The other captions a sample's json lists under ``"captions"`` (whitespace-normalised, empty ones
    dropped); () when there is no json or no such list. A malformed list is reported (naming the shard and
    key) and ignored: the sample keeps its txt caption."""
    data = raw.members.get("json")
    if data is None:
        return ()
    try:
        listed = json.loads(data).get("captions")
    except (ValueError, AttributeError):  # not JSON, or not an object: nothing to choose from
        listed = None
    if listed is None:
        return ()
    if not isinstance(listed, list) or not all(isinstance(c, str) for c in listed):
        global _caption_warnings
        if _caption_warnings < _MAX_CAPTION_WARNINGS:
            _caption_warnings += 1
            logger.warning("%s: sample %s: json 'captions' is not a list of strings (%.80r); using its txt "
                           "caption only", raw.shard, raw.key, listed)
        return ()
    return tuple(t for t in (" ".join(c.split()) for c in listed) if t)


def fit_longest_side(w: int, h: int, side: int) -> tuple[int, int]:
    s = side / max(w, h)
    return max(1, round(w * s)), max(1, round(h * s))


def sample_caption(raw: RawSample) -> tuple[str, str | None]:
    """(the sample's caption, whitespace-normalised; None) or ("", the reason it has none:
    ``MISSING_CAPTION`` / ``BAD_CAPTION``, not UTF-8)."""
    txt = raw.members.get("txt")
    if txt is None:
        return "", MISSING_CAPTION
    try:
        return " ".join(txt.decode("utf-8").split()), None
    except UnicodeDecodeError:
        return "", BAD_CAPTION


def decode_sample(raw: RawSample, max_side: int) -> DecodedSample | str:
    """Decode one raw sample, or return the reason it is unusable.

    A complete 8-bit grey/colour JPEG already at its final size (what the shard writer stores) is decoded
    by libjpeg-turbo straight into packed RGB (``data_pipeline.jpeg``), its header read without PIL; every
    other image (PNG, CMYK, a resize, a file cut short or with a header the fast reader does not know) goes
    through PIL, which also makes the format and decompression-bomb checks."""
    data = raw.image_bytes()
    if data is None:
        return MISSING_IMAGE
    caption, reason = sample_caption(raw)
    if reason is not None:
        return reason
    frame = jpeg_frame(data)
    size = None if frame is None else (frame.width, frame.height)
    if size is not None and fit_longest_side(*size, max_side) == size and has_end_marker(data):
        try:
            return DecodedSample(raw.key, decode_jpeg_hwc(data), caption)
        except OSError:
            return UNDECODABLE_IMAGE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if img.format == "JPEG" and max(w, h) >= 2 * max_side:
                # DCT-domain downscale (1/2..1/8) while decoding; draft keeps both sides ≥ the request.
                img.draft("RGB", fit_longest_side(w, h, max_side))
            img.load()
            if img.mode != "RGB":
                img = img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError):
        return UNDECODABLE_IMAGE
    size = fit_longest_side(img.width, img.height, max_side)
    if size != img.size:
        img = img.resize(size, Image.Resampling.BILINEAR)
    return DecodedSample(raw.key, np.asarray(img), caption)  # (h, w, 3) uint8, read-only view


GPU_DECODABLE_MODES = ("RGB", "L")  # JPEG colour modes nvjpeg turns into RGB (ImageReadMode.RGB)


def undecodable_header(data: bytes) -> str | None:
    """None if ``data`` is a JPEG the GPU path decodes (baseline/progressive, RGB or grey), "other" if it is
    another readable image (decoded on the CPU instead), UNDECODABLE_IMAGE if not even its header reads."""
    if jpeg_frame(data) is not None:  # 8-bit huffman grey/colour JPEG: nvjpeg's kind
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))  # reads the header only
            fmt, mode, (w, h) = img.format, img.mode, img.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError):
        return UNDECODABLE_IMAGE
    if w < 1 or h < 1:
        return UNDECODABLE_IMAGE
    return None if fmt == "JPEG" and mode in GPU_DECODABLE_MODES else "other"


def undecoded_sample(raw: RawSample, max_side: int) -> DecodedSample | str:
    """``gpu_decode``'s stage 4: the caption decoded, the JPEG bytes kept as they are (``image``: 1-D
    uint8); a sample the GPU path cannot decode goes through :func:`decode_sample` (``image`` (h, w, 3))."""
    data = raw.image_bytes()
    if data is None:
        return MISSING_IMAGE
    header = undecodable_header(data)
    if header == "other":
        return decode_sample(raw, max_side)
    caption, reason = sample_caption(raw)
    if reason is not None:
        return reason
    if header is not None:
        return header
    return DecodedSample(raw.key, np.frombuffer(data, dtype=np.uint8), caption)


def images_to_batch(
    images: list[torch.Tensor], max_side: int, pad_multiple: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``gpu_decode`` batch's ``images`` → (pixel_values uint8 (B, 3, H, W), pixel_mask (B, H, W)) on
    ``device``, as :class:`Collator` pads them: JPEG bytes (1-D) decoded there with
    ``torchvision.io.decode_jpeg`` (nvjpeg on CUDA, one batched call), resized so the longest side is
    ``max_side`` (bilinear, antialiased: PIL's filter up to rounding; no DCT-domain draft as on the CPU path);
    already decoded (h, w, 3) images are copied over."""
    from torchvision.transforms.v2.functional import resize

    device = torch.device(device)
    jpeg_at = [i for i, t in enumerate(images) if t.dim() == 1]
    out: list[torch.Tensor | None] = [None] * len(images)
    if jpeg_at:
        data = [images[i] for i in jpeg_at]
        try:
            decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        except RuntimeError as e:
            raise ValueError(f"decode_jpeg on {device} failed for a batch of {len(data)} JPEGs: {e}") from e
        for i, img in zip(jpeg_at, decoded, strict=True):  # (3, h, w) uint8
            h, w = img.shape[-2:]
            nw, nh = fit_longest_side(int(w), int(h), max_side)
            if (nh, nw) != (h, w):
                img = resize(img, [nh, nw], antialias=True)
            out[i] = img.permute(1, 2, 0)
    for i, t in enumerate(images):
        if t.dim() == 3:
            out[i] = t.to(device)
        elif t.dim() != 1:
            raise ValueError(f"images[{i}]: expected JPEG bytes (1-D) or an (h, w, 3) image, "
                             f"got shape {tuple(t.shape)}")
    return pad_images([t for t in out if t is not None], pad_multiple)


class Collator:
    """Pads and tokenizes a list of decoded samples into the batch dict (docs/DESIGN.md "The batch").

    Pixels stay uint8: the model normalises them on its device (``soho.encoder.normalize_pixels``), so the
    loader makes no per-sample float copies. The batch is stored channels-last — (B, H, W, 3) memory viewed
    as (B, 3, H, W) — so each decoded (h, w, 3) image goes in with one row-contiguous copy.
    With ``LoaderConfig.gpu_decode`` there are no pixels at all: ``images`` holds each sample's JPEG bytes
    (see :func:`images_to_batch`).
    """

    def __init__(self, cfg: LoaderConfig) -> None:
        self.cfg = cfg
        self.tokenizer = load_tokenizer(cfg.tokenizer)
        self.tokenize = batch_tokenizer(cfg.tokenizer, cfg.max_text_len)
        self.words = vocabulary_words(self.tokenizer) if cfg.text_augment.enabled else []

    def __call__(
        self, samples: list[DecodedSample], salt: str = "",
        padded: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> dict[str, Any]:
        """The batch of ``samples``; ``salt`` (the samples' place in the stream) seeds the caption
        augmentation together with the run seed and each sample's key, so that it is resumable.
        ``padded``: the samples' (pixel_values, pixel_mask) already padded by an :class:`ImageBatchBuilder`
        (their ``image`` is then None), instead of padding ``samples``' images here."""
        # Per-image tensors are small: torch's intra-op threads only add hand-off stalls (milliseconds when
        # the cores are busy), so run this part on one thread and restore the caller's setting after.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._collate(samples, salt, padded)
        finally:
            torch.set_num_threads(threads)

    def _captions(self, samples: list[DecodedSample], salt: str) -> list[str]:
        seed = self.cfg.seed
        texts = [random.Random(f"{seed}/caption/{salt}/{s.key}").choice((s.caption, *s.alternatives))
                 if s.alternatives else s.caption for s in samples]
        aug = self.cfg.text_augment
        if not aug.enabled:
            return texts
        return [augment_caption(t, random.Random(f"{seed}/text/{salt}/{s.key}"), aug, self.words)
                for t, s in zip(texts, samples, strict=True)]

    def _collate(
        self, samples: list[DecodedSample], salt: str = "",
        padded: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> dict[str, Any]:
        if padded is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # read-only numpy views: we only read them
                images = [torch.from_numpy(s.image) for s in samples]
        if self.cfg.gpu_decode:
            pixels: dict[str, Any] = {"images": images}
        else:
            values, mask = padded if padded is not None else pad_images(images, self.cfg.pad_multiple)
            pixels = {"pixel_values": values, "pixel_mask": mask}
        input_ids, attention_mask = self.tokenize(self._captions(samples, salt))
        return {**pixels, "input_ids": input_ids, "attention_mask": attention_mask,
                "keys": [s.key for s in samples]}


class ImageBatchBuilder:
    """:func:`pad_images`, one image at a time: each decoded (h, w, 3) image is copied into the batch's
    uint8 buffer as soon as it is decoded, while its pixels are still in the CPU cache, and then dropped, so
    the decoder's next output reuses the same (cache-warm) memory. Padding the list at the end instead reads
    every image back from memory (14 MB for 32 images of 384²) after the decoder has allocated a fresh
    buffer for each.

    The buffer is sized for the previous batch's padded (H, W) (the common case: mixed aspect ratios pad
    every batch to ``max_side`` square) and grows when an image does not fit; a batch that ends smaller than
    its buffer (a short last batch, or all-landscape images after a square one) is compacted by one copy.
    Copies are numpy's (one thread: no OpenMP hand-off per image). :meth:`finish` returns exactly what
    :func:`pad_images` returns for the same images (tested)."""

    def __init__(self, capacity: int, pad_multiple: int) -> None:
        self.capacity, self.pad_multiple = capacity, pad_multiple
        self._hint = (0, 0)  # the last finished batch's padded (H, W)
        self._buf: torch.Tensor | None = None
        self._sizes: list[tuple[int, int]] = []

    def __len__(self) -> int:
        return len(self._sizes)

    def _padded(self, n: int) -> int:
        return math.ceil(n / self.pad_multiple) * self.pad_multiple

    def _allocate(self, hb: int, wb: int) -> None:
        old, n = self._buf, len(self._sizes)
        buf = torch.empty(self.capacity, hb, wb, 3, dtype=torch.uint8)
        if old is not None and n:  # grow: move the images so far, zero their new padding
            oh, ow = old.shape[1:3]
            arr, prev = buf.numpy(), old.numpy()
            arr[:n, :oh, :ow] = prev[:n]
            arr[:n, :oh, ow:] = 0
            arr[:n, oh:] = 0
        self._buf = buf

    def add(self, image: np.ndarray) -> None:
        """Copy one (h, w, 3) uint8 image into the next slot."""
        if len(self._sizes) >= self.capacity:
            raise ValueError(f"ImageBatchBuilder: batch already holds {self.capacity} images")
        h, w = image.shape[:2]
        if self._buf is None:
            self._allocate(max(self._hint[0], self._padded(h)), max(self._hint[1], self._padded(w)))
        else:
            hb, wb = self._buf.shape[1:3]
            if h > hb or w > wb:
                self._allocate(max(hb, self._padded(h)), max(wb, self._padded(w)))
        assert self._buf is not None
        arr = self._buf.numpy()[len(self._sizes)]  # (Hb, Wb, 3)
        arr[:h, :w] = image
        if w < arr.shape[1]:
            arr[:h, w:] = 0
        if h < arr.shape[0]:
            arr[h:] = 0
        self._sizes.append((h, w))

    def finish(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(pixel_values uint8 (B, 3, H, W) channels-last, pixel_mask bool (B, H, W)) of the images added
        since the last call, as :func:`pad_images` pads them; the builder is then empty."""
        if not self._sizes or self._buf is None:
            raise ValueError("ImageBatchBuilder.finish: no image was added")
        n = len(self._sizes)
        H = self._padded(max(h for h, _ in self._sizes))
        W = self._padded(max(w for _, w in self._sizes))
        hwc = self._buf
        if hwc.shape[:3] != (n, H, W):
            hwc = hwc[:n, :H, :W].contiguous()
        mask = torch.zeros(n, H, W, dtype=torch.bool)
        mask_arr = mask.numpy()
        for i, (h, w) in enumerate(self._sizes):
            mask_arr[i, :h, :w] = True
        self._hint, self._buf, self._sizes = (H, W), None, []
        return hwc.permute(0, 3, 1, 2), mask


class BatchTokenizer:
    """``(input_ids, attention_mask)`` int64 (B, T) of "[CLS] text [SEP] [PAD]…", padded to the longest and
    truncated at ``max_len``: exactly ``tokenizer(texts, padding="longest", truncation=True,
    max_length=max_len)``, from a private copy of the fast tokenizer's Rust backend configured once. (The
    transformers call re-configures its backend on every call: ~0.3 ms per caption of Python overhead,
    a tenth of a JPEG decode.)"""

    def __init__(self, tokenizer: Any, max_len: int) -> None:
        backend = tokenizer.backend_tokenizer  # a tokenizers.Tokenizer
        self.backend = type(backend).from_str(backend.to_str())
        self.backend.enable_truncation(max_len, strategy="longest_first", direction=tokenizer.truncation_side)
        self.backend.enable_padding(direction=tokenizer.padding_side, pad_id=tokenizer.pad_token_id,
                                    pad_type_id=tokenizer.pad_token_type_id, pad_token=tokenizer.pad_token)

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        encodings = self.backend.encode_batch(texts)
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.int64)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.int64)
        return ids, mask


@functools.lru_cache(maxsize=8)
def batch_tokenizer(name_or_path: str | None, max_len: int) -> BatchTokenizer:
    """One configured :class:`BatchTokenizer` per (tokenizer, length) and process: building its backend
    copy costs ~0.1 s, which every epoch's collator would otherwise pay again."""
    return BatchTokenizer(load_tokenizer(name_or_path), max_len)


def pad_images(images: list[torch.Tensor], pad_multiple: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (h, w, 3) images → (pixel_values uint8 (B, 3, H, W) channels-last, pixel_mask bool (B, H, W)),
    zero-padded at the bottom/right to the largest H, W rounded up to ``pad_multiple``; on the images' device.
    """
    m = pad_multiple
    H = math.ceil(max(img.shape[0] for img in images) / m) * m
    W = math.ceil(max(img.shape[1] for img in images) / m) * m
    device = images[0].device
    # empty + explicit zero padding: every page of a fresh (often mmapped) tensor is touched once.
    hwc = torch.empty(len(images), H, W, 3, dtype=torch.uint8, device=device)
    pixel_mask = torch.zeros(len(images), H, W, dtype=torch.bool, device=device)
    for i, img in enumerate(images):
        h, w, _ = img.shape
        hwc[i, :h, :w] = img
        if w < W:
            hwc[i, :h, w:] = 0
        if h < H:
            hwc[i, h:] = 0
        pixel_mask[i, :h, :w] = True
    return hwc.permute(0, 3, 1, 2), pixel_mask


def pin_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch with every tensor (also those in lists: ``images``) in page-locked memory."""
    def pin(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v.pin_memory()
        if isinstance(v, list):
            return [pin(x) for x in v]
        return v
    return {k: pin(v) for k, v in batch.items()}


# ------------------------------------------------------------------------------------ one worker's stream


def _open_shard(url: str, storage_options: dict[str, Any]) -> Any:
    fs, path = get_fs(url, storage_options)
    if not fs.protocol or "file" not in fs.protocol:
        return fs.open(path, "rb", block_size=8 * 2**20)
    return open(path, "rb", buffering=2**20)  # 1 MiB: few read syscalls for the tar reader's small reads


class WorkerStream:
    """The batches of one (rank, worker) for one epoch, starting from a saved position.

    Position = ``{"pos": index of the window's first shard in this worker's sequence (resampled: number of
    shards drawn before the window), "item": items of that window already consumed, "end": the next
    window's pos (only while item > 0), "done": bool}``. ``plan``: this stream's work for a reshaped pass
    (``assignment.StreamPlan``: carried windows, then fresh shards; sequence positions count the carried
    windows first), None for the usual ``epoch_shards``; ``generation``: reshapes so far (names the seeds of
    planned and resampled streams, see ``assignment.stream_key``).
    Yields ``(kind, batch | None, position after it, bad-count delta, findings delta)`` with kind "batch" or
    "end"; findings = ``{"rejected": {shard: cause}, "failed": [(shard, cause), ...]}`` (shards rejected by
    verification; shards that gave nothing).
    """

    def __init__(
        self, cfg: LoaderConfig, shards: list[str], rank: int, world_size: int, worker: int, num_workers: int,
        epoch: int, start: dict[str, Any] | None, records: dict[str, ShardRecord] | None = None,
        rejected: dict[str, str] | None = None, plan: StreamPlan | None = None, generation: int = 0,
    ) -> None:
        self.cfg, self.shards, self.rank, self.world_size = cfg, shards, rank, world_size
        self.plan, self.generation = plan, generation
        self.worker, self.num_workers, self.epoch = worker, num_workers, epoch
        self.start = dict(start or {"pos": 0, "item": 0, "done": False})
        self.records = records or {}
        self.rejected = dict(rejected or {})  # shard → cause: known bad, skipped without reading
        self.bad: Counter[str] = Counter()
        self._new_rejected: dict[str, str] = {}
        self._new_failed: list[tuple[str, str]] = []
        self._streak: list[tuple[str, str]] = []

    def _read_shard(self, url: str, count_bad: bool) -> tuple[list[RawSample], str]:
        """The shard's samples that pass the checks, and (if there are none) why it gave nothing."""
        if self.cfg.verify and url in self.rejected:
            return [], f"rejected earlier: {self.rejected[url]}"
        problems: list[str] = []

        def on_bad(reason: str, detail: str) -> None:
            if count_bad:
                self.bad[reason] += 1
            problems.append(f"{reason} ({detail})")
            logger.warning("shard %s: skipping bad content (%s): %s", url, reason, detail)

        def reject(reason: str, detail: str) -> tuple[list[RawSample], str]:
            if count_bad:
                self.bad[reason] += 1
            cause = f"{reason} ({detail})"
            self.rejected[url] = self._new_rejected[url] = cause
            n = self.records[url]
            logger.warning("shard %s: %s; none of its samples is used, in this pass or later ones "
                           "(manifest: %s bytes, sha256 %s)", url, cause, n.bytes, n.sha256)
            return [], cause

        verify = self.cfg.verify
        rec = self.records.get(url) if verify else None
        out: list[RawSample] = []
        try:
            with _open_shard(url, self.cfg.storage_options) as f:
                if rec is not None and rec.bytes is not None:
                    size = _stream_size(f)
                    if size is not None and size != rec.bytes:
                        return reject(SHARD_SIZE_MISMATCH, f"{size} bytes, the manifest says {rec.bytes}")
                stream = HashingReader(f) if rec is not None and rec.sha256 else f
                required = rec is not None and rec.hashed_samples
                # With the shard's own sha256 checked, the samples' hashes are only computed if it fails
                # (to name the changed samples): a window holds whole shards, so nothing of a shard is
                # used before its verdict, and a shard with the manifest's bytes has its writer's samples.
                shard_hashed = isinstance(stream, HashingReader)
                for raw in iter_tar(stream, url, on_bad):
                    why = check_sample_hashes(raw, required, not shard_hashed) if verify else None
                    if why is not None:
                        on_bad(why, f"sample {raw.key!r}")
                    else:
                        out.append(raw)
                if shard_hashed:
                    assert rec is not None
                    stream.drain()
                    size_bad = rec.bytes is not None and stream.nbytes != rec.bytes
                    digest = stream.hexdigest()
                    if size_bad or digest != rec.sha256:
                        for raw in out:  # which samples changed, for the log and the counts
                            why = check_sample_hashes(raw, required)
                            if why is not None:
                                on_bad(why, f"sample {raw.key!r}")
                    if size_bad:
                        return reject(SHARD_SIZE_MISMATCH,
                                      f"read {stream.nbytes} bytes, the manifest says {rec.bytes}")
                    if digest != rec.sha256:
                        return reject(SHARD_HASH_MISMATCH, f"sha256 {digest}")
        except (OSError, ValueError) as e:  # missing object, permission, bad URL: skip the shard
            on_bad(UNREADABLE_SHARD, f"{type(e).__name__}: {e}")
            return [], problems[-1]
        if out:
            return out, ""
        if not problems:
            return [], "no samples in the tar"
        more = f"; and {len(problems) - 3} more problems" if len(problems) > 3 else ""
        return [], "; ".join(problems[:3]) + more

    def _read(self, url: str, count_bad: bool) -> list[RawSample]:
        """``_read_shard`` plus the streak of shards giving nothing (``max_bad_shards_in_row``)."""
        got, cause = self._read_shard(url, count_bad)
        if got:
            self._streak = []
            return got
        self._new_failed.append((url, cause))
        self._streak.append((url, cause))
        if len(self._streak) >= self.cfg.max_bad_shards_in_row:
            raise DataUnreadableError(
                f"{len(self._streak)} shards in a row gave no usable sample (rank {self.rank}, worker "
                f"{self.worker}, epoch {self.epoch}; "
                f"max_bad_shards_in_row={self.cfg.max_bad_shards_in_row}): "
                f"{_name_shards(self._streak)}")
        return []

    def _windows(self, pos: int, skip: int) -> Iterator[WindowRead]:
        """This stream's windows (``assignment.iter_windows``) from position (pos, skip)."""
        cfg = self.cfg
        if cfg.resampled:
            key, n = stream_key(self.rank, self.worker, self.generation), len(self.shards)
            return iter_windows((), lambda i: resample_index(cfg.seed, key, i, n),
                                lambda i, count: self._read(self.shards[i], count),
                                pos, skip, cfg.shuffle_buffer, cfg.seed, self.epoch, key)
        order = pass_order(self.shards, cfg.seed, self.epoch)
        plan, key = stream_work(self.plan, self.rank, self.world_size, self.worker, self.num_workers,
                                len(order), self.generation)
        fresh = plan.fresh
        return iter_windows(plan.windows, lambda i: int(fresh[i]) if i < len(fresh) else None,
                            lambda i, count: self._read(order[i], count),
                            pos, skip, cfg.shuffle_buffer, cfg.seed, self.epoch, key)

    def __iter__(
        self,
    ) -> Iterator[tuple[str, dict[str, Any] | None, dict[str, Any], dict[str, int], dict[str, Any]]]:
        cfg = self.cfg
        collate = Collator(cfg)
        decode = undecoded_sample if cfg.gpu_decode else decode_sample
        builder = None if cfg.gpu_decode else ImageBatchBuilder(cfg.batch_size, cfg.pad_multiple)
        any_caption = cfg.caption_choice == "any"
        if self.start.get("done"):
            return
        pending: list[DecodedSample] = []
        reported: Counter[str] = Counter()

        def delta() -> tuple[dict[str, int], dict[str, Any]]:
            d = {k: v - reported[k] for k, v in self.bad.items() if v != reported[k]}
            reported.update(d)
            found = {"rejected": self._new_rejected, "failed": self._new_failed}
            self._new_rejected, self._new_failed = {}, []
            return d, found

        pos = int(self.start["pos"])
        for win in self._windows(pos, int(self.start["item"])):
            for idx in range(win.skip, len(win.order)):
                raw = win.items[win.order[idx]]
                out = decode(raw, cfg.max_image_side)
                if isinstance(out, str):
                    self.bad[out] += 1
                else:
                    if any_caption:
                        out.alternatives = sample_alternatives(raw)
                    if builder is not None:
                        builder.add(out.image)
                        out.image = None  # in the batch buffer now; free the decoder's copy at once
                    pending.append(out)
                if len(pending) == cfg.batch_size:
                    salt = f"{self.epoch}/{self.rank}/{self.worker}/{win.pos}/{idx}"
                    pixels = builder.finish() if builder is not None else None
                    yield "batch", collate(pending, salt, pixels), position_after(win, idx), *delta()
                    pending = []
            pos = win.end
            if not win.items and cfg.resampled:
                raise RuntimeError(
                    f"resampled shards yield no samples (rank {self.rank}, worker {self.worker})")
        end = {"pos": pos, "item": 0, "done": True}
        if pending and not cfg.drop_last:
            salt = f"{self.epoch}/{self.rank}/{self.worker}/{pos}/end"
            pixels = builder.finish() if builder is not None else None
            yield "batch", collate(pending, salt, pixels), end, *delta()
        yield "end", None, end, *delta()


class _EpochDataset(IterableDataset):
    """torch IterableDataset wrapper: each DataLoader worker runs its own WorkerStream."""

    def __init__(self, loader: PretrainLoader, epoch: int, starts: dict[int, dict[str, Any]]) -> None:
        super().__init__()
        self.cfg, self.shards, self.records = loader.cfg, loader.shards, loader.records
        self.rank, self.world_size = loader.rank, loader.world_size
        self.epoch, self.starts = epoch, starts
        self.rejected = dict(loader.rejected_shards())
        self.plans, self.generation = loader.epoch_plans(), loader.generation

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
        stream = WorkerStream(self.cfg, self.shards, self.rank, self.world_size, wid, nw, self.epoch,
                              self.starts.get(wid), self.records, self.rejected,
                              None if self.plans is None else self.plans[wid], self.generation)
        for item in stream:
            yield (wid, *item)


# -------------------------------------------------------------------------------------------- the loader


class PretrainLoader:
    """Iterable of batches for one rank; see the module docstring for the stages and the resume semantics."""

    def __init__(self, cfg: LoaderConfig, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if cfg.batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {cfg.batch_size}")
        if cfg.max_bad_shards_in_row < 1:
            raise ValueError(f"max_bad_shards_in_row must be ≥ 1, got {cfg.max_bad_shards_in_row}")
        if cfg.caption_choice not in CAPTION_CHOICES:
            raise ValueError(f"LoaderConfig.caption_choice={cfg.caption_choice!r}: one of {CAPTION_CHOICES}")
        if cfg.pin_memory and not torch.cuda.is_available():
            raise ValueError("LoaderConfig.pin_memory=True needs CUDA (page-locked memory is for host→GPU "
                             "copies), but torch.cuda.is_available() is False")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.shards, self.records = resolve_shard_records(cfg.urls, cfg.storage_options)
        self.num_streams = max(1, cfg.num_workers)
        if not cfg.resampled:
            check_enough_shards(len(self.shards), world_size, cfg.num_workers, f"shards from {cfg.urls!r}")
        load_tokenizer(cfg.tokenizer)  # fail here, not inside a worker, if the tokenizer is missing
        self.epoch = 0
        self._positions: dict[int, dict[str, Any]] = {}
        self._next_worker = 0
        self._bad: Counter[str] = Counter()
        self._rejected: dict[str, str] = {}  # shard → why verification rejected it (skipped from then on)
        self._pass_failed: dict[str, str] = {}  # shard → cause: shards that gave nothing in this pass
        self.batches_yielded = 0
        self.generation = 0  # reshapes (world size / workers changed) so far: names reseeded streams
        self._plans: dict[str, Any] | None = None  # {"epoch", "streams": {worker: plan}}: a reshaped pass
        self._plans_cache: tuple[int, dict[int, StreamPlan] | None] | None = None

    # -- resumable state
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION, "epoch": self.epoch, "seed": self.cfg.seed, "rank": self.rank,
            "world_size": self.world_size, "num_workers": self.num_streams, "resampled": self.cfg.resampled,
            "num_shards": len(self.shards), "next_worker": self._next_worker,
            "positions": {str(k): dict(v) for k, v in self._positions.items()},
            "bad_counts": dict(self._bad), "batches_yielded": self.batches_yielded,
            "rejected_shards": dict(self._rejected), "generation": self.generation,
            "plans": self._live_plans(),
        }

    def _layout(self) -> dict[str, Any]:
        return {"seed": self.cfg.seed, "rank": self.rank, "world_size": self.world_size,
                "num_workers": self.num_streams, "resampled": self.cfg.resampled,
                "num_shards": len(self.shards)}

    def _live_plans(self) -> dict[str, Any] | None:
        return self._plans if self._plans is not None and self._plans["epoch"] == self.epoch else None

    def epoch_plans(self) -> dict[int, StreamPlan] | None:
        """{worker: plan} when the current epoch is a pass carried over from another world shape, else
        None."""
        if self._plans_cache is None or self._plans_cache[0] != self.epoch:
            live = self._live_plans()
            self._plans_cache = (self.epoch, state_plans({"plans": live}, self.epoch))
        return self._plans_cache[1]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where ``state`` (this rank's ``state_dict()``, same world size and workers) left
        off. Another world shape: :meth:`load_states_from`."""
        version = state.get("version", 1)
        if version not in (1, STATE_VERSION):
            raise ValueError(f"loader state has version {version!r}; this loader reads versions 1 and "
                             f"{STATE_VERSION}")
        for k, v in self._layout().items():
            if state.get(k) != v:
                hint = " (another world size or worker count: use load_states_from with every rank's state)" \
                    if k in ("world_size", "num_workers") else ""
                raise ValueError(f"loader state was saved with {k}={state.get(k)!r} but this loader has "
                                 f"{k}={v!r}; an exact resume needs the same value{hint}")
        plans = state.get("plans")
        if plans is not None:
            streams = plans.get("streams", {}) if isinstance(plans, dict) else {}
            if sorted(int(w) for w in streams) != list(range(self.num_streams)):
                raise ValueError(f"loader state: plans for workers {sorted(streams)} but this loader has "
                                 f"{self.num_streams} worker stream(s)")
        self.epoch = int(state["epoch"])
        self._positions = {int(k): dict(v) for k, v in state["positions"].items()}
        self._next_worker = int(state["next_worker"])
        self._bad = Counter(state.get("bad_counts", {}))
        self.batches_yielded = int(state.get("batches_yielded", 0))
        self._rejected = dict(state.get("rejected_shards", {}))
        self.generation = int(state.get("generation", 0))
        self._plans = dict(plans) if plans is not None else None
        self._plans_cache = None
        self.epoch_plans()  # a malformed plan fails here, not in a DataLoader worker

    def load_states_from(self, states: list[dict[str, Any]]) -> None:
        """Continue a run saved by another world: ``states`` = every OLD rank's ``state_dict()``, in old rank
        order; this loader is built for the new world (rank, world_size, num_workers).

        Same world size and workers: exactly ``load_state_dict(states[rank])``. Otherwise (epoch mode) the
        rest of the interrupted pass is split over the new streams so that each of its samples not yet
        delivered is delivered exactly once (``assignment.carry_plans``; semantics and exceptions in
        ``data_pipeline/assignment.py``'s docstring); later epochs use the new world's ``epoch_shards``.
        Resampled: every stream is reseeded (``generation`` + 1 in its seed key, deterministic) and starts
        afresh. Counters: ``bad_sample_counts`` and ``batches_yielded`` take this rank's share (the sum of old
        ranks ``o`` with ``o % world_size == rank``, so the sums over ranks carry on); rejected shards: the
        union of every old rank's.
        """
        check_old_states(states)
        old = states[0]
        if old.get("world_size") == self.world_size and old.get("num_workers") == self.num_streams:
            self.load_state_dict(states[self.rank])
            return
        for k, v in self._layout().items():
            if k not in ("rank", "world_size", "num_workers") and old.get(k) != v:
                raise ValueError(f"load_states_from: the old loader states were saved with "
                                 f"{k}={old.get(k)!r} but this loader has {k}={v!r}; a carried position "
                                 "needs the same value")
        for i, s in enumerate(states):
            if s.get("version", 1) not in (1, STATE_VERSION):
                raise ValueError(f"load_states_from: states[{i}] has version {s.get('version')!r}; this "
                                 f"loader reads versions 1 and {STATE_VERSION}")
        bad: Counter[str] = Counter()
        batches = 0
        rejected: dict[str, str] = {}
        for o, s in enumerate(states):
            if o % self.world_size == self.rank:
                bad.update(s.get("bad_counts", {}))
                batches += int(s.get("batches_yielded", 0))
            for url, cause in sorted(s.get("rejected_shards", {}).items()):
                rejected.setdefault(url, cause)
        self._bad, self.batches_yielded, self._rejected = bad, batches, rejected
        self._next_worker = 0
        self._positions = {}
        self._plans, self._plans_cache = None, None
        generation = max(int(s.get("generation", 0)) for s in states) + 1
        where = (f"{len(states)} rank(s) × {old.get('num_workers')} worker(s) → {self.world_size} × "
                 f"{self.num_streams}")
        if self.cfg.resampled:
            self.epoch, self.generation = 0, generation
            logger.info("loader rank %d: resampled streams reseeded after a reshape (%s), generation %d",
                        self.rank, where, generation)
            return
        carry = carry_plans(states, self.world_size, self.num_streams, ranks=[self.rank])
        self.epoch, self.generation = carry.epoch, carry.generation
        if carry.lagging_ranks:
            logger.warning("loader rank %d: old rank(s) %s were saved before epoch %d, which the run is in; "
                           "the rest of their earlier epoch is left out (as on a resume without a reshape)",
                           self.rank, carry.lagging_ranks, carry.epoch)
        if carry.plans is not None:
            streams = {w: carry.plans[(self.rank, w)] for w in range(self.num_streams)}
            self._plans = {"epoch": carry.epoch,
                           "streams": {str(w): plan_to_json(p) for w, p in streams.items()}}
            for w, p in streams.items():
                if not p.windows and len(p.fresh) == 0:
                    self._positions[w] = {"pos": 0, "item": 0, "done": True}  # nothing left for this stream
        logger.info("loader rank %d: epoch %d carried over a reshape (%s): %d partly read window(s) and %d "
                    "unstarted shard(s) split over the new streams", self.rank, carry.epoch, where,
                    carry.carried_windows, carry.unstarted_shards)

    def bad_sample_counts(self) -> dict[str, int]:
        """{reason: count} of samples skipped while loading (cumulative, survives resume)."""
        return dict(self._bad)

    def rejected_shards(self) -> dict[str, str]:
        """{shard URL: cause} of the shards verification rejected (left out of later passes)."""
        return dict(self._rejected)

    # -- iteration
    def __iter__(self) -> Iterator[dict[str, Any]]:
        while self.cfg.resampled or self.cfg.epochs is None or self.epoch < self.cfg.epochs:
            yield from self._iter_epoch()
            if self.cfg.resampled:
                return
            self.epoch += 1
            self._positions, self._next_worker = {}, 0
            self._plans = self._plans_cache = None  # a reshape plan covers only the pass it interrupted

    def _source(self, starts: dict[int, dict[str, Any]]) -> Iterator[tuple]:
        ds = _EpochDataset(self, self.epoch, starts)
        if self.cfg.num_workers == 0:
            return iter(ds)
        # pin_memory: DataLoader's pin thread pins the batches while the workers build the next ones.
        dl = DataLoader(ds, batch_size=None, num_workers=self.cfg.num_workers,
                        prefetch_factor=self.cfg.prefetch_factor, persistent_workers=False,
                        pin_memory=self.cfg.pin_memory)
        return iter(dl)

    def _iter_epoch(self) -> Iterator[dict[str, Any]]:
        n = self.num_streams
        active = [w for w in range(n) if not self._positions.get(w, {}).get("done")]
        if not active:
            return
        queues: dict[int, deque] = {w: deque() for w in range(n)}
        from_start = not self._positions and self.epoch_plans() is None
        batches = 0
        self._pass_failed.clear()
        source = self._source({w: self._positions[w] for w in self._positions})
        try:
            # Round-robin by worker in a fixed order: the global batch sequence does not depend on which
            # process happens to be faster, so a restored loader continues with exactly the same batches.
            while active:
                w = self._next_worker if self._next_worker in active else active[0]
                while not queues[w]:
                    try:
                        wid, kind, batch, pos, bad, found = next(source)
                    except StopIteration:
                        raise RuntimeError(f"loader worker {w} stopped without its end marker") from None
                    queues[wid].append((kind, batch, pos, bad, found))
                kind, batch, pos, bad, found = queues[w].popleft()
                self._positions[w] = pos
                self._bad.update(bad)
                self._rejected.update(found["rejected"])
                for url, cause in found["failed"]:
                    self._pass_failed.setdefault(url, cause)
                i = active.index(w)
                if kind == "end":
                    active.remove(w)
                    self._next_worker = active[i % len(active)] if active else 0
                    continue
                self._next_worker = active[(i + 1) % len(active)]
                self.batches_yielded += 1
                batches += 1
                yield pin_batch(batch) if self.cfg.pin_memory and self.cfg.num_workers == 0 else batch
            if from_start and batches == 0 and not self.cfg.resampled:
                failed = list(self._pass_failed.items())
                where = self.cfg.urls if isinstance(self.cfg.urls, str) else "the configured list"
                raise DataUnreadableError(
                    f"epoch {self.epoch} of rank {self.rank} gave no batch from {len(self.shards)} shard(s) "
                    f"of {where}; samples skipped by reason: {dict(self._bad)}; shards that gave nothing: "
                    f"{_name_shards(failed) if failed else 'none'}")
        finally:
            # Stop DataLoader worker processes now (~0.1 s): left to the garbage collector after an error,
            # the iterator took ~5 s to go.
            shutdown = getattr(source, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
