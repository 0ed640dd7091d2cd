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
5. ``collate``          pad images bottom/right to a multiple of ``pad_multiple`` (pixel_mask True on real
                        pixels), ImageNet-normalise, tokenize "[CLS] caption [SEP] [PAD]…" (fast BERT
                        WordPiece), attention masks.

Epochs (non-resampled): one pass over every shard; each sample is delivered exactly once per epoch across
all ranks and workers. ``LoaderConfig.epochs``: ``None`` iterates forever (epoch after epoch), ``n`` stops
once ``loader.epoch == n``. A worker's last batch of an epoch may be short unless ``drop_last``.
With ``num_workers > 0`` batches are built inside torch DataLoader workers and re-ordered round-robin by
worker in this process, so the global batch order is the same whatever the processes' timing, and
``state_dict()`` (each worker's position + whose turn is next) restores it exactly.
"""

from __future__ import annotations

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

from data_pipeline.storage import expand_braces, get_fs
from data_pipeline.tarstream import RawSample, iter_tar
from data_pipeline.tokenizer import load_tokenizer

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # DataLoader workers fork; no nested thread pools
logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STATE_VERSION = 1

# Reasons counted while loading (beside tarstream's truncated_tar / unsafe_member_name / unreadable_shard).
UNDECODABLE_IMAGE = "undecodable_image"
MISSING_IMAGE = "missing_image"
MISSING_CAPTION = "missing_caption"
BAD_CAPTION = "caption_not_utf8"


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


# ------------------------------------------------------------------------------------------ shard list

def resolve_shards(urls: str | list[str], storage_options: dict[str, Any] | None = None) -> list[str]:
    """Turn the configured ``urls`` into the list of shard URLs."""
    if isinstance(urls, (list, tuple)):
        if not urls:
            raise ValueError("LoaderConfig.urls is an empty list")
        return [str(u) for u in urls]
    if urls.endswith(".json"):
        fs, path = get_fs(urls, storage_options)
        if not fs.exists(path):
            raise FileNotFoundError(f"manifest {urls} does not exist")
        with fs.open(path, "rb") as f:
            manifest = json.loads(f.read())
        if "shards" not in manifest:
            raise ValueError(f"{urls} is not a shard manifest (no 'shards' list)")
        base = urls.rsplit("/", 1)[0] if "/" in urls else "."
        shards = [f"{base}/{s['name']}" for s in manifest["shards"] if s.get("samples", 1) > 0]
        if not shards:
            raise ValueError(f"manifest {urls} lists no non-empty shards")
        return shards
    return expand_braces(urls)


def epoch_shards(
    shards: list[str], seed: int, epoch: int, rank: int, world_size: int, worker: int, num_workers: int
) -> list[str]:
    """This worker's shards for one epoch: shuffled by (seed, epoch), split by node, then by worker."""
    order = list(shards)
    random.Random(f"{seed}/shards/{epoch}").shuffle(order)
    return order[rank::world_size][worker::num_workers]


def check_enough_shards(n_shards: int, world_size: int, num_workers: int, what: str) -> None:
    need = world_size * max(1, num_workers)
    if n_shards < need:
        raise ValueError(
            f"{what}: {n_shards} shard(s) < world_size {world_size} × workers {max(1, num_workers)} = {need}; "
            "every rank and worker needs at least one shard — write more, smaller shards "
            "(--samples-per-shard), use fewer workers, or set resampled=True"
        )


# ------------------------------------------------------------------------------------------ decoding


@dataclass
class DecodedSample:
    key: str
    image: np.ndarray  # uint8 (h, w, 3)
    caption: str


def fit_longest_side(w: int, h: int, side: int) -> tuple[int, int]:
    s = side / max(w, h)
    return max(1, round(w * s)), max(1, round(h * s))


def decode_sample(raw: RawSample, max_side: int) -> DecodedSample | str:
    """Decode one raw sample, or return the reason it is unusable."""
    data = raw.image_bytes()
    if data is None:
        return MISSING_IMAGE
    txt = raw.members.get("txt")
    if txt is None:
        return MISSING_CAPTION
    try:
        caption = " ".join(txt.decode("utf-8").split())
    except UnicodeDecodeError:
        return BAD_CAPTION
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


class Collator:
    """Pads, normalises and tokenizes a list of decoded samples into the batch dict (docs/DESIGN.md)."""

    def __init__(self, cfg: LoaderConfig) -> None:
        self.cfg = cfg
        self.tokenizer = load_tokenizer(cfg.tokenizer)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        self.scale = 1.0 / (255.0 * std)
        self.bias = -torch.tensor(IMAGENET_MEAN).view(3, 1, 1) / std

    def __call__(self, samples: list[DecodedSample]) -> dict[str, Any]:
        # Per-image tensors are small: torch's intra-op threads only add hand-off stalls (milliseconds when
        # the cores are busy), so run this part on one thread and restore the caller's setting after.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._collate(samples)
        finally:
            torch.set_num_threads(threads)

    def _collate(self, samples: list[DecodedSample]) -> dict[str, Any]:
        m = self.cfg.pad_multiple
        H = math.ceil(max(s.image.shape[0] for s in samples) / m) * m
        W = math.ceil(max(s.image.shape[1] for s in samples) / m) * m
        # empty + explicit zero padding: every page of this (often > 32 MiB, so freshly mmapped) tensor
        # is touched once, instead of once by zeros() and again by the copy.
        pixel_values = torch.empty(len(samples), 3, H, W, dtype=torch.float32)
        pixel_mask = torch.zeros(len(samples), H, W, dtype=torch.bool)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only numpy views: we only read them
            images = [torch.from_numpy(s.image) for s in samples]
        for i, img in enumerate(images):
            h, w, _ = img.shape
            out = pixel_values[i, :, :h, :w]
            out.copy_(img.permute(2, 0, 1)).mul_(self.scale).add_(self.bias)
            pixel_values[i, :, :h, w:] = 0
            pixel_values[i, :, h:, :] = 0
            pixel_mask[i, :h, :w] = True
        tok = self.tokenizer(
            [s.caption for s in samples],
            padding="longest",
            truncation=True,
            max_length=self.cfg.max_text_len,
            return_tensors="pt",
        )
        return {
            "pixel_values": pixel_values,
            "pixel_mask": pixel_mask,
            "input_ids": tok["input_ids"].to(torch.int64),
            "attention_mask": tok["attention_mask"].to(torch.int64),
            "keys": [s.key for s in samples],
        }


# ------------------------------------------------------------------------------------ one worker's stream


def _open_shard(url: str, storage_options: dict[str, Any]) -> Any:
    fs, path = get_fs(url, storage_options)
    return fs.open(path, "rb", block_size=8 * 2**20) if not fs.protocol or "file" not in fs.protocol else open(path, "rb")


class WorkerStream:
    """The batches of one (rank, worker) for one epoch, starting from a saved position.

    Position = ``{"pos": index of the window's first shard in this worker's sequence (resampled: number of
    shards drawn before the window), "item": items of that window already consumed, "done": bool}``.
    Yields ``(kind, batch | None, position after it, bad-count delta)`` with kind "batch" or "end".
    """

    def __init__(
        self, cfg: LoaderConfig, shards: list[str], rank: int, world_size: int, worker: int, num_workers: int,
        epoch: int, start: dict[str, Any] | None,
    ) -> None:
        self.cfg, self.shards, self.rank, self.world_size = cfg, shards, rank, world_size
        self.worker, self.num_workers, self.epoch = worker, num_workers, epoch
        self.start = dict(start or {"pos": 0, "item": 0, "done": False})
        self.bad: Counter[str] = Counter()

    def _shard_at(self, i: int, mine: list[str] | None) -> str | None:
        if mine is not None:
            return mine[i] if i < len(mine) else None
        rng = random.Random(f"{self.cfg.seed}/resample/{self.rank}/{self.worker}/{i}")
        return self.shards[rng.randrange(len(self.shards))]

    def _read_window(self, pos: int, mine: list[str] | None, count_bad: bool) -> tuple[list[RawSample], int]:
        """Raw samples of the window starting at shard ``pos``; returns them and the next window's pos."""
        items: list[RawSample] = []
        target = max(1, self.cfg.shuffle_buffer)

        def on_bad(reason: str, detail: str) -> None:
            if count_bad:
                self.bad[reason] += 1
            logger.warning("skipping bad shard content (%s): %s", reason, detail)

        while len(items) < target:
            url = self._shard_at(pos, mine)
            if url is None:
                break
            pos += 1
            try:
                with _open_shard(url, self.cfg.storage_options) as f:
                    items.extend(iter_tar(f, url, on_bad))
            except (OSError, ValueError) as e:  # missing object, permission, bad URL: skip the shard
                on_bad("unreadable_shard", f"{url}: {type(e).__name__}: {e}")
        return items, pos

    def __iter__(self) -> Iterator[tuple[str, dict[str, Any] | None, dict[str, Any], dict[str, int]]]:
        cfg = self.cfg
        mine = None if cfg.resampled else epoch_shards(
            self.shards, cfg.seed, self.epoch, self.rank, self.world_size, self.worker, self.num_workers)
        collate = Collator(cfg)
        pos, skip = int(self.start["pos"]), int(self.start["item"])
        if self.start.get("done"):
            return
        pending: list[DecodedSample] = []
        reported: Counter[str] = Counter()

        def delta() -> dict[str, int]:
            d = {k: v - reported[k] for k, v in self.bad.items() if v != reported[k]}
            reported.update(d)
            return d

        first = True
        while True:
            # Re-reading the window we resume into must not count its shard-level problems twice.
            items, next_pos = self._read_window(pos, mine, count_bad=not (first and skip > 0))
            first = False
            if not items and next_pos == pos:
                break  # no shards left (non-resampled end of epoch)
            order = list(range(len(items)))
            if cfg.shuffle_buffer > 1:
                random.Random(f"{cfg.seed}/window/{self.epoch}/{self.rank}/{self.worker}/{pos}").shuffle(order)
            for idx in range(skip, len(order)):
                out = decode_sample(items[order[idx]], cfg.max_image_side)
                if isinstance(out, str):
                    self.bad[out] += 1
                else:
                    pending.append(out)
                if len(pending) == cfg.batch_size:
                    nxt = {"pos": pos, "item": idx + 1, "done": False}
                    if idx + 1 == len(order):
                        nxt = {"pos": next_pos, "item": 0, "done": False}
                    yield "batch", collate(pending), nxt, delta()
                    pending = []
            pos, skip = next_pos, 0
            if not items and mine is None:
                raise RuntimeError(f"resampled shards yield no samples (rank {self.rank}, worker {self.worker})")
        end = {"pos": pos, "item": 0, "done": True}
        if pending and not cfg.drop_last:
            yield "batch", collate(pending), end, delta()
        yield "end", None, end, delta()


class _EpochDataset(IterableDataset):
    """torch IterableDataset wrapper: each DataLoader worker runs its own WorkerStream."""

    def __init__(self, loader: PretrainLoader, epoch: int, starts: dict[int, dict[str, Any]]) -> None:
        super().__init__()
        self.cfg, self.shards = loader.cfg, loader.shards
        self.rank, self.world_size = loader.rank, loader.world_size
        self.epoch, self.starts = epoch, starts

    def __iter__(self) -> Iterator[tuple[int, str, dict[str, Any] | None, dict[str, Any], dict[str, int]]]:
        info = get_worker_info()
        wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
        stream = WorkerStream(self.cfg, self.shards, self.rank, self.world_size, wid, nw, self.epoch,
                              self.starts.get(wid))
        for kind, batch, pos, bad in stream:
            yield wid, kind, batch, pos, bad


# -------------------------------------------------------------------------------------------- the loader


class PretrainLoader:
    """Iterable of batches for one rank; see the module docstring for the stages and the resume semantics."""

    def __init__(self, cfg: LoaderConfig, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if cfg.batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {cfg.batch_size}")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.shards = resolve_shards(cfg.urls, cfg.storage_options)
        self.num_streams = max(1, cfg.num_workers)
        if not cfg.resampled:
            check_enough_shards(len(self.shards), world_size, cfg.num_workers, f"shards from {cfg.urls!r}")
        load_tokenizer(cfg.tokenizer)  # fail here, not inside a worker, if the tokenizer is missing
        self.epoch = 0
        self._positions: dict[int, dict[str, Any]] = {}
        self._next_worker = 0
        self._bad: Counter[str] = Counter()
        self.batches_yielded = 0

    # -- resumable state
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION, "epoch": self.epoch, "seed": self.cfg.seed, "rank": self.rank,
            "world_size": self.world_size, "num_workers": self.num_streams, "resampled": self.cfg.resampled,
            "num_shards": len(self.shards), "next_worker": self._next_worker,
            "positions": {str(k): dict(v) for k, v in self._positions.items()},
            "bad_counts": dict(self._bad), "batches_yielded": self.batches_yielded,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expect = {"seed": self.cfg.seed, "rank": self.rank, "world_size": self.world_size,
                  "num_workers": self.num_streams, "resampled": self.cfg.resampled, "num_shards": len(self.shards)}
        for k, v in expect.items():
            if state.get(k) != v:
                raise ValueError(f"loader state was saved with {k}={state.get(k)!r} but this loader has {k}={v!r}; "
                                 "an exact resume needs the same value")
        self.epoch = int(state["epoch"])
        self._positions = {int(k): dict(v) for k, v in state["positions"].items()}
        self._next_worker = int(state["next_worker"])
        self._bad = Counter(state.get("bad_counts", {}))
        self.batches_yielded = int(state.get("batches_yielded", 0))

    def bad_sample_counts(self) -> dict[str, int]:
        """{reason: count} of samples skipped while loading (cumulative, survives resume)."""
        return dict(self._bad)

    # -- iteration
    def __iter__(self) -> Iterator[dict[str, Any]]:
        while self.cfg.resampled or self.cfg.epochs is None or self.epoch < self.cfg.epochs:
            yield from self._iter_epoch()
            if self.cfg.resampled:
                return
            self.epoch += 1
            self._positions, self._next_worker = {}, 0

    def _source(self, starts: dict[int, dict[str, Any]]) -> Iterator[tuple]:
        ds = _EpochDataset(self, self.epoch, starts)
        if self.cfg.num_workers == 0:
            return iter(ds)
        dl = DataLoader(ds, batch_size=None, num_workers=self.cfg.num_workers,
                        prefetch_factor=self.cfg.prefetch_factor, persistent_workers=False)
        return iter(dl)

    def _iter_epoch(self) -> Iterator[dict[str, Any]]:
        n = self.num_streams
        active = [w for w in range(n) if not self._positions.get(w, {}).get("done")]
        if not active:
            return
        queues: dict[int, deque] = {w: deque() for w in range(n)}
        source = self._source({w: self._positions[w] for w in self._positions})
        # Round-robin by worker in a fixed order: the global batch sequence does not depend on which
        # process happens to be faster, so a restored loader continues with exactly the same batches.
        while active:
            w = self._next_worker if self._next_worker in active else active[0]
            while not queues[w]:
                try:
                    wid, kind, batch, pos, bad = next(source)
                except StopIteration:
                    raise RuntimeError(f"loader worker {w} stopped without its end marker") from None
                queues[wid].append((kind, batch, pos, bad))
            kind, batch, pos, bad = queues[w].popleft()
            self._positions[w] = pos
            self._bad.update(bad)
            i = active.index(w)
            if kind == "end":
                active.remove(w)
                self._next_worker = active[i % len(active)] if active else 0
                continue
            self._next_worker = active[(i + 1) % len(active)]
            self.batches_yielded += 1
            yield batch
