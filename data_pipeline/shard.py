"""``python -m data_pipeline shard``: sources → WebDataset shards, in parallel, resumable, shardable by job.

How work is laid out (this is what makes resume and parallel jobs simple):

* Row ``r`` of the source (one table row / annotation / file / tar sample) belongs to shard
  ``r // samples_per_shard``; shard ``k`` therefore always covers the same rows, whatever happened before.
* Threads of the main process download a chunk's URLs (``fetch.Fetcher``: total deadline, size cap);
  worker processes then read local/fsspec files, decode, repair, resize and re-encode the chunk; the main
  process takes the results in row order, drops duplicates (a bounded LRU of image+caption digests and of
  source keys), writes the shard (temporary name, then move) and then a small record
  ``_work/{prefix}-{k:06d}.json``
  (counts, sha256, rejected rows, repairs, the digests it accepted). The record is the commit: a rerun
  skips every shard that has one (replaying its digests into the LRU so that later shards dedupe exactly
  as in an uninterrupted run) and redoes the rest.
* ``--num-jobs N --job-index I``: job I owns shards ``k`` with ``k % N == I`` — disjoint shard indices, no
  coordinator. Each job writes ``_work/job-{I:05d}-of-{N:05d}.json`` when done; the job that finds all N
  parts present writes ``manifest.json`` (or run ``python -m data_pipeline merge-manifests``). Dedupe is
  per job: identical pairs owned by different jobs are both kept.
* One input never stops the job: any failure on one row becomes a ``bad_samples.jsonl`` record (its own
  reason, else ``unexpected_error`` with the exception); a worker process that dies (OOM killer, a crash
  in a decoder) has its chunk redone in a fresh process, then row by row (``worker_crashed``). Only a
  failure to write the output raises (``OutputStorageError``, naming the output); a relaunch resumes.
* ``manifest.json`` and ``bad_samples.jsonl`` are rebuilt from the records, so they are right after any
  number of interruptions and identical to those of an uninterrupted run.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import logging
import math
import multiprocessing as mp
import os
import sys
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterator
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from typing import Any

from configcli import add_flags, from_flat, leaves, opt
from data_pipeline import images as im
from data_pipeline.fetch import DEFAULT_MAX_BYTES, USER_AGENT, Fetcher
from data_pipeline.sources import FORMATS, Source, SourceError, SourceRow
from data_pipeline.storage import get_fs, join, read_json, write_json
from data_pipeline.writer import (
    BAD_SAMPLES_NAME,
    MANIFEST_NAME,
    ShardInfo,
    ShardSample,
    build_manifest,
    write_manifest_and_report,
    write_shard,
)

logger = logging.getLogger(__name__)
WORK_DIR = "_work"


@dataclass
class ShardJobConfig:
    """One shard job; each field is a flag of ``python -m data_pipeline shard`` (``configcli``), in --help
    order."""

    source: str = field(metadata=opt("table, a folder or glob of table parts, COCO json, VG "
                                     "region_descriptions.json, image folder, tar(s); path or URL"))
    output: str = field(metadata=opt("output URL or path (file://, s3://bucket/prefix, memory://)"))
    samples_per_shard: int = field(
        default=1000,
        metadata=opt("image-text pairs per shard tar (row r of the source goes to shard r // this)"))
    workers: int = field(default=2, metadata=opt("worker processes (0: in this process)"))  # 0: debugging
    max_image_side: int = field(
        default=512,
        metadata=opt("images are resized so that their longest side is at most this many pixels"))
    source_format: str = field(
        default="auto",
        metadata=opt("how to read --source (auto: from its extension or layout)", choices=FORMATS))
    image_column: str = field(
        default="image", metadata=opt("table column with the image: path, URL or (Parquet) bytes"))
    caption_column: str = field(default="caption", metadata=opt("table column with the caption"))
    key_column: str | None = field(
        default=None, metadata=opt("optional column of unique keys (duplicates rejected)"))
    image_root: str | None = field(  # COCO/table images relative to this instead of the source's folder
        default=None,
        metadata=opt("folder that relative image paths are under (default: the source's own folder)"))
    prefix: str = field(default="shards", metadata=opt("shard file names: PREFIX-000000.tar, …"))
    max_pixels: int = field(
        default=im.DEFAULT_MAX_PIXELS,
        metadata=opt("decompression-bomb limit: larger images (width × height) are rejected"))
    jpeg_quality: int = field(default=90, metadata=opt("JPEG quality of the re-encoded images"))
    max_caption_chars: int = field(default=1000, metadata=opt("longer captions are cut at a word boundary"))
    columns: list[str] | None = field(
        default=None,
        metadata=opt("header-less CSV/TSV: column names in file order, e.g. caption,url (CC3M)"))
    vg_max_regions: int = field(
        default=10, metadata=opt("--source-format vg: at most this many region phrases (pairs) per image"))
    url_timeout: float = field(  # one deadline per URL: all attempts, redirects and body bytes
        default=10.0, metadata=opt("total seconds per URL: every attempt, redirect and body byte"))
    url_retries: int = field(
        default=2, metadata=opt("retries of connect/read errors, 429 and 5xx (within --url-timeout)"))
    max_image_bytes: int = field(
        default=DEFAULT_MAX_BYTES,
        metadata=opt("larger downloads are refused while streaming (url_too_large)"))
    respect_noai: bool = field(  # X-Robots-Tag: noai / noimageai → skipped and reported
        default=True,
        metadata=opt("fetch images whose X-Robots-Tag says noai/noimageai (skipped and reported by default)",
                     negated_flag="ignore-noai"))
    user_agent: str = field(default=USER_AGENT, metadata=opt("User-Agent header of image downloads"))
    fetch_threads: int = field(
        default=16,
        metadata=opt("concurrent downloads per worker process (run by the main process: workers × this)"))
    chunk_size: int = field(default=64, metadata=opt("rows per worker task"))
    dedupe_window: int = field(  # bounded memory, whatever the source size
        default=1_000_000,
        metadata=opt("image+caption digests and keys remembered to drop duplicates "
                     "(bounded memory, ~100 B each)"))
    num_jobs: int = field(default=1, metadata=opt("parallel jobs sharing this output"))
    job_index: int = field(  # the CLI reads $JOB_COMPLETION_INDEX when the flag is not given
        default=0, metadata=opt("this job's index (default: $JOB_COMPLETION_INDEX or 0)"))
    progress: bool = field(
        default=True, metadata=opt("no progress bar on stderr", negated_flag="no-progress"))
    # Not a flag: output (and s3 source) fsspec options, filled by the --s3-* storage flags.
    storage_options: dict[str, Any] = field(default_factory=dict)

    def fingerprint(self) -> dict[str, Any]:
        """Settings that decide shard contents: a rerun with different ones must not mix outputs."""
        keys = ("source", "source_format", "image_column", "caption_column", "key_column", "image_root",
                "samples_per_shard", "max_image_side", "prefix", "max_pixels", "jpeg_quality",
                "max_caption_chars", "dedupe_window", "num_jobs", "columns", "vg_max_regions")
        return {k: getattr(self, k) for k in keys}

    def validate(self) -> None:
        """Every numeric setting against its accepted range; the message names the flag (ValueError)."""
        def need(flag: str, value: Any, ok: bool, accepted: str) -> None:
            if not ok:
                raise ValueError(f"{flag} must be {accepted} (got {value})")

        ints = [("--samples-per-shard", self.samples_per_shard, 1, None),
                ("--workers", self.workers, 0, 1024),
                ("--max-image-side", self.max_image_side, 16, 65_536),
                ("--max-pixels", self.max_pixels, 256, None),
                ("--jpeg-quality", self.jpeg_quality, 1, 100),
                ("--max-caption-chars", self.max_caption_chars, 1, None),
                ("--url-retries", self.url_retries, 0, 20),
                ("--fetch-threads", self.fetch_threads, 1, 1024),
                ("--max-image-bytes", self.max_image_bytes, 1024, None),
                ("--dedupe-window", self.dedupe_window, 1, None),
                ("--chunk-size", self.chunk_size, 1, 100_000),
                ("--num-jobs", self.num_jobs, 1, None),
                ("--vg-max-regions", self.vg_max_regions, 1, None)]
        for flag, v, lo, hi in ints:
            accepted = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
            ok = isinstance(v, int) and not isinstance(v, bool) and v >= lo and (hi is None or v <= hi)
            need(flag, v, ok, accepted)
        need("--url-timeout", self.url_timeout, isinstance(self.url_timeout, (int, float))
             and math.isfinite(self.url_timeout) and 0 < self.url_timeout <= 3600, "in (0, 3600] seconds")
        need("--job-index", self.job_index,
             isinstance(self.job_index, int) and 0 <= self.job_index < self.num_jobs,
             f"in [0, --num-jobs {self.num_jobs})")
        if self.columns is not None:
            need("--columns", ",".join(self.columns), len(self.columns) > 0 and all(self.columns)
                 and len(set(self.columns)) == len(self.columns), "a comma-separated list of distinct names")


class OutputStorageError(RuntimeError):
    """Writing to the output failed: the one failure that ends a job (a relaunch resumes)."""


# ----------------------------------------------------------------------------------- worker processes


@dataclass
class RowResult:
    row: int
    source_id: str
    key: str | None
    bad: str | None = None
    detail: str = ""
    caption: str = ""
    jpeg: bytes = b""
    width: int = 0
    height: int = 0
    original_size: tuple[int, int] = (0, 0)
    repairs: list[str] = field(default_factory=list)
    digest: str = ""


_WCFG: ShardJobConfig | None = None
_FETCH_POOL: cf.ThreadPoolExecutor | None = None
_FETCHER: Fetcher | None = None


def _init_worker(cfg: ShardJobConfig) -> None:
    global _WCFG, _FETCH_POOL, _FETCHER
    _WCFG = cfg
    _FETCH_POOL = cf.ThreadPoolExecutor(max_workers=max(1, cfg.fetch_threads))
    _FETCHER = Fetcher(cfg.url_timeout, cfg.url_retries, cfg.max_image_bytes, pool_size=cfg.fetch_threads,
                       user_agent=cfg.user_agent, respect_noai=cfg.respect_noai)


def fetch_url(url: str, timeout: float, retries: int, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """One-off GET through a fresh ``Fetcher`` (the shard job keeps one per worker process)."""
    f = Fetcher(timeout, retries, max_bytes, pool_size=1)
    try:
        return f.fetch(url)
    finally:
        f.close()


def _read_path(path: str, opts: dict[str, Any]) -> bytes:
    try:
        if "://" not in path:
            with open(path, "rb") as f:
                return f.read()
        fs, p = get_fs(path, opts)
        with fs.open(p, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise im.BadSample(im.MISSING_FILE, path) from None
    except IsADirectoryError:
        raise im.BadSample(im.MISSING_FILE, f"{path} is a directory") from None
    except OSError as e:
        raise im.BadSample(im.MISSING_FILE, f"{path}: {e}") from None


def _load_image_bytes(image: str | bytes | None, cfg: ShardJobConfig) -> bytes:
    if image is None:
        raise im.BadSample(im.MISSING_FILE, "no image reference")
    if isinstance(image, bytes):
        return image
    if not isinstance(image, str):
        raise im.BadSample(im.BAD_IMAGE_REFERENCE,
                           f"image reference is a {type(image).__name__}, not a string")
    if image.startswith(("http://", "https://")):
        assert _FETCHER is not None, "worker not initialised"
        return _FETCHER.fetch(image)
    return _read_path(image, cfg.storage_options)


def _unexpected(e: BaseException) -> tuple[str, str]:
    """A failure nobody foresaw, for one input: reported with its type and message; the job goes on."""
    logger.debug("unexpected error on one input", exc_info=e)
    return im.UNEXPECTED_ERROR, f"{type(e).__name__}: {e}"[:2000]


def process_chunk(start_row: int, rows: list[SourceRow]) -> list[RowResult]:
    """Worker task: validate captions, fetch (threads) and transform the images of consecutive rows."""
    cfg = _WCFG
    assert cfg is not None and _FETCH_POOL is not None, "worker not initialised"
    results: list[RowResult] = []
    captions: dict[int, tuple[str, list[str]]] = {}
    for i, r in enumerate(rows):
        res = RowResult(start_row + i, r.source_id, r.key, bad=r.bad, detail=r.detail)
        results.append(res)
        if res.bad:
            continue
        try:
            raw_caption = r.caption
            if r.caption_path is not None:
                try:
                    raw_caption = _read_path(r.caption_path, cfg.storage_options)
                except im.BadSample:
                    raise im.BadSample(im.MISSING_CAPTION, r.caption_path) from None
            captions[i] = im.process_caption(raw_caption, cfg.max_caption_chars)
        except im.BadSample as e:
            res.bad, res.detail = e.reason, e.detail
        except Exception as e:  # one input never stops the job
            res.bad, res.detail = _unexpected(e)
    # Fetch the images of rows still good concurrently (URLs are I/O bound) and transform them in row
    # order as they arrive. The first connections are staggered by a couple of milliseconds: a burst of
    # simultaneous connects overflows small listen backlogs (python's http.server has 5) and each dropped
    # SYN costs a 1 s retransmit; after the first round the threads stay naturally staggered.
    futures: dict[int, cf.Future] = {}
    for n, i in enumerate(captions):
        if n and n < cfg.fetch_threads and isinstance(rows[i].image, str) and "://" in rows[i].image:
            time.sleep(0.002)
        futures[i] = _FETCH_POOL.submit(_load_image_bytes, rows[i].image, cfg)
    for i, fut in futures.items():
        res = results[i]
        try:
            data = fut.result()
            out = im.process_image(data, cfg.max_image_side, cfg.max_pixels, cfg.jpeg_quality)
            text, cap_repairs = captions[i]
            h = hashlib.blake2b(digest_size=8)
            h.update(data)
            h.update(b"\0")
            h.update(text.encode("utf-8"))
        except im.BadSample as e:
            res.bad, res.detail = e.reason, e.detail
            continue
        except Exception as e:  # one input never stops the job
            res.bad, res.detail = _unexpected(e)
            continue
        del data
        res.caption, res.jpeg, res.width, res.height = text, out.jpeg, out.width, out.height
        res.original_size = (out.original_width, out.original_height)
        res.repairs, res.digest = out.repairs + cap_repairs, h.hexdigest()
    return results


# --------------------------------------------------------------------------------------- main process


class _LRU:
    """Bounded set with insertion-order eviction: dedupe memory does not grow with the dataset."""

    def __init__(self, capacity: int) -> None:
        self.capacity, self.d = capacity, OrderedDict()

    def get(self, k: str) -> Any:
        return self.d.get(k)

    def add(self, k: str, v: Any) -> None:
        self.d[k] = v
        if len(self.d) > self.capacity:
            self.d.popitem(last=False)


WORKER_CRASHED = "worker_crashed"


@dataclass
class _PendingShard:
    index: int
    rows: tuple[int, int]  # [start, end)
    record: dict[str, Any] | None = None  # set when the shard was committed by an earlier run
    futures: list[cf.Future] = field(default_factory=list)
    tasks: list[_Task] = field(default_factory=list)  # one per future


@dataclass
class _Task:
    """A chunk in flight. Its rows are kept until it succeeds, to be redone if its worker process dies."""

    r0: int
    rows: list[SourceRow] | None

    def done(self, fut: cf.Future) -> None:
        if not fut.cancelled() and fut.exception() is None:
            self.rows = None


@dataclass
class ShardSummary:
    rows: int = 0
    samples: int = 0
    shards: int = 0
    skipped_shards: int = 0  # completed by an earlier run
    rejected: dict[str, int] = field(default_factory=dict)
    repaired: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    samples_per_second: float = 0.0  # samples processed by this run / wall time
    manifest: str | None = None  # set when this run wrote manifest.json

    def text(self) -> str:
        lines = [f"rows read: {self.rows}; samples written: {self.samples} in {self.shards} shard(s) "
                 f"({self.skipped_shards} already complete); {self.seconds:.1f}s, "
                 f"{self.samples_per_second:.1f} samples/s",
                 f"rejected: {sum(self.rejected.values())} {dict(sorted(self.rejected.items()))}",
                 f"repaired: {sum(self.repaired.values())} {dict(sorted(self.repaired.items()))}"]
        if self.manifest:
            lines.append(f"manifest: {self.manifest}")
        return "\n".join(lines)


def _record_path(root: str, prefix: str, k: int) -> str:
    return join(root, WORK_DIR, f"{prefix}-{k:06d}.json")


def _job_part_path(root: str, i: int, n: int) -> str:
    return join(root, WORK_DIR, f"job-{i:05d}-of-{n:05d}.json")


def _chunks(it: Iterator[SourceRow], size: int) -> Iterator[tuple[int, list[SourceRow]]]:
    buf: list[SourceRow] = []
    start = 0
    for row in it:
        buf.append(row)
        if len(buf) == size:
            yield start, buf
            start += size
            buf = []
    if buf:
        yield start, buf


class _InProcessExecutor:
    """workers=0: same code path, no processes (debugging, tiny jobs)."""

    def __init__(self, cfg: ShardJobConfig) -> None:
        _init_worker(cfg)

    def submit(self, fn: Callable, *args: Any) -> cf.Future:
        fut: cf.Future = cf.Future()
        try:
            fut.set_result(fn(*args))
        except Exception as e:  # as a process pool would: the failure surfaces from result()
            fut.set_exception(e)
        return fut

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


def run_shard_job(cfg: ShardJobConfig) -> ShardSummary:
    """Run (or resume) one shard job; see the module docstring. Returns the summary of this run."""
    cfg.validate()
    t0 = time.time()
    source = Source(cfg.source, cfg.source_format, cfg.image_column, cfg.caption_column, cfg.key_column,
                    cfg.image_root, cfg.storage_options, columns=cfg.columns,
                    vg_max_regions=cfg.vg_max_regions)

    def storage(what: str, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as e:
            raise OutputStorageError(
                f"output {cfg.output!r}: {what} failed ({type(e).__name__}: {e}); the job stopped, rerun the "
                "same command to resume from the last committed shard") from e

    fs, root = get_fs(cfg.output, cfg.storage_options)
    storage("creating the work folder", fs.makedirs, join(root, WORK_DIR), True)
    settings_path = join(root, WORK_DIR, "settings.json")
    settings = {**cfg.fingerprint(), "source_format": source.fmt, **source.identity()}
    if source.fmt != "vg":
        settings.pop("vg_max_regions")
    if fs.exists(settings_path):
        old = read_json(fs, settings_path)
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if diff:  # (settings added since that output was written compare as unset)
            raise ValueError(f"output {cfg.output!r} holds a shard job with other settings {diff}; "
                             "use a new output location")
    else:
        storage(f"writing {settings_path}", write_json, fs, settings_path, settings)
    mine = lambda k: k % cfg.num_jobs == cfg.job_index  # noqa: E731 - a one-line ownership rule
    done = {}
    for p in fs.glob(join(root, WORK_DIR, f"{cfg.prefix}-*.json")):
        rec = read_json(fs, p)
        done[rec["index"]] = rec
    for p in fs.glob(join(root, f"{cfg.prefix}-*.tar.tmp-*")):  # leftovers of a killed run of this job
        k = int(p.rsplit("/", 1)[-1][len(cfg.prefix) + 1 :].split(".")[0])
        if mine(k):
            fs.rm(p)

    summary = ShardSummary()
    keys_seen, digests_seen = _LRU(cfg.dedupe_window), _LRU(cfg.dedupe_window)
    def new_pool(workers: int) -> cf.ProcessPoolExecutor:
        return cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"), initializer=_init_worker,
                                      initargs=(cfg,))

    executor: Any = _InProcessExecutor(cfg) if cfg.workers <= 0 else new_pool(cfg.workers)

    pool_lock = threading.Lock()

    def pool_submit(r0: int, rows: list[SourceRow]) -> cf.Future:
        nonlocal executor
        with pool_lock:
            try:
                return executor.submit(process_chunk, r0, rows)
            except BrokenProcessPool:  # a worker died (killed for memory, a crash in a decoder): start afresh
                logger.warning("a worker process died; starting a new pool (the rows it had are redone)")
                executor.shutdown(wait=False, cancel_futures=True)
                executor = new_pool(cfg.workers)
                return executor.submit(process_chunk, r0, rows)

    # URLs are fetched here, by threads of this process, and only chunks whose downloads are all finished
    # go to the worker processes: a worker never sits idle on a slow server (a URL may take the whole
    # --url-timeout), so CPU work goes on while up to workers × --fetch-threads downloads wait.
    n_fetch = max(1, cfg.fetch_threads) * max(1, cfg.workers)
    loader = cf.ThreadPoolExecutor(n_fetch, thread_name_prefix="fetch") if cfg.workers > 0 else None
    fetcher = (Fetcher(cfg.url_timeout, cfg.url_retries, cfg.max_image_bytes, pool_size=n_fetch,
                       user_agent=cfg.user_agent, respect_noai=cfg.respect_noai) if loader else None)

    def submit(r0: int, rows: list[SourceRow]) -> cf.Future:
        urls = [j for j, r in enumerate(rows) if r.bad is None and isinstance(r.image, str)
                and r.image.startswith(("http://", "https://"))
                # (a row whose caption is not text is rejected without fetching its image)
                and (isinstance(r.caption, (str, bytes)) or r.caption_path is not None)]
        if loader is None or fetcher is None or not urls:
            return pool_submit(r0, rows)
        final: cf.Future = cf.Future()
        loaded = list(rows)
        left = [len(urls)]
        lock = threading.Lock()

        def forward(inner: cf.Future) -> None:
            if inner.cancelled():
                final.cancel()
            elif inner.exception() is not None:
                final.set_exception(inner.exception())  # type: ignore[arg-type]
            else:
                final.set_result(inner.result())

        def fetch(j: int) -> None:
            r = rows[j]
            try:
                loaded[j] = replace(r, image=fetcher.fetch(r.image))  # type: ignore[arg-type]
            except im.BadSample as e:
                loaded[j] = replace(r, bad=e.reason, detail=e.detail)
            except Exception as e:  # one input never stops the job
                reason, detail = _unexpected(e)
                loaded[j] = replace(r, bad=reason, detail=detail)
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if last:
                try:
                    pool_submit(r0, loaded).add_done_callback(forward)
                except Exception as e:  # the pool is shut down (the job is ending) or cannot start
                    final.set_exception(e)

        for j in urls:
            loader.submit(fetch, j)
        return final

    def redo(task: _Task, sids: list[str]) -> list[RowResult]:
        """Rows of a task whose worker died: again in a pool of their own, then one by one; the row that
        kills its worker every time is reported as ``worker_crashed`` and the job goes on."""
        assert task.rows is not None
        pool = new_pool(1)
        try:
            try:
                return pool.submit(process_chunk, task.r0, task.rows).result()
            except BrokenProcessPool:
                pool.shutdown(wait=False, cancel_futures=True)
                pool = new_pool(1)
            out: list[RowResult] = []
            for j, row in enumerate(task.rows):
                try:
                    out.extend(pool.submit(process_chunk, task.r0 + j, [row]).result())
                except BrokenProcessPool:
                    out.append(RowResult(task.r0 + j, sids[j], row.key, bad=WORKER_CRASHED,
                                         detail="the worker process died on this input twice (killed for "
                                                "memory, or a crash in a decoder)"))
                    pool.shutdown(wait=False, cancel_futures=True)
                    pool = new_pool(1)
            return out
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    max_inflight = max(6, 6 * max(1, cfg.workers))  # chunks: enough rows to cover a URL's whole deadline
    pending: deque[_PendingShard] = deque()
    open_futures: deque[cf.Future] = deque()
    written: list[int] = []
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(unit="row", desc=f"shard job {cfg.job_index}/{cfg.num_jobs}", file=sys.stderr,
                   mininterval=0.5)
    processed_samples = 0

    def finalize(ps: _PendingShard) -> None:
        nonlocal processed_samples
        if ps.record is None:
            results: list[RowResult] = []
            for fut, task in zip(ps.futures, ps.tasks, strict=True):
                try:
                    results.extend(fut.result())
                    continue
                except BrokenProcessPool:
                    if task.rows is not None:
                        results.extend(redo(task, [r.source_id for r in task.rows]))
                        task.rows = None
                        continue
                    e: Exception = RuntimeError("worker died")
                except Exception as exc:  # the task itself failed (e.g. a result that would not pickle)
                    e = exc
                reason, detail = _unexpected(e)
                rows = task.rows or []
                results.extend(RowResult(task.r0 + j, r.source_id, None, bad=reason,
                                         detail=f"worker task: {detail}")
                               for j, r in enumerate(rows))
                task.rows = None
            rec = storage(f"writing shard {ps.index}", _commit_shard, fs, root, cfg, ps, results, keys_seen,
                          digests_seen)
            processed_samples += rec["samples"]
            written.append(ps.index)
        else:
            rec = ps.record
            for d in rec["dedupe"]:
                digests_seen.add(d[0], d[1])
            for k in rec["keys"]:
                keys_seen.add(k[0], k[1])
            summary.skipped_shards += 1
        summary.samples += rec["samples"]
        summary.shards += 1 if rec["samples"] else 0
        for b in rec["bad"]:
            summary.rejected[b["reason"]] = summary.rejected.get(b["reason"], 0) + 1
        for kind, c in rec["repaired"].items():
            summary.repaired[kind] = summary.repaired.get(kind, 0) + c
        if bar is not None:
            bar.update(ps.rows[1] - ps.rows[0])
            el = max(time.time() - t0, 1e-6)
            bar.set_postfix(samples_s=f"{processed_samples / el:.1f}", bad=sum(summary.rejected.values()))

    try:
        n = cfg.samples_per_shard
        for start, rows in _chunks(iter(source), cfg.chunk_size):
            summary.rows = start + len(rows)
            # Split the chunk at shard boundaries so each task belongs to exactly one shard.
            offset = 0
            while offset < len(rows):
                r0 = start + offset
                k = r0 // n
                take = min(len(rows) - offset, (k + 1) * n - r0)
                part = rows[offset : offset + take]
                offset += take
                if not mine(k):
                    continue
                if not pending or pending[-1].index != k:
                    pending.append(_PendingShard(k, (k * n, k * n), record=done.get(k)))
                ps = pending[-1]
                ps.rows = (ps.rows[0], r0 + take)
                if ps.record is None:
                    fut = submit(r0, part)
                    task = _Task(r0, part)
                    fut.add_done_callback(task.done)
                    ps.futures.append(fut)
                    ps.tasks.append(task)
                    open_futures.append(fut)
                # Backpressure: at most max_inflight unfinished tasks (bounded memory, any source size).
                while len(open_futures) > max_inflight:
                    open_futures.popleft().exception()  # waits; a failure is reported by finalize
                # Commit, in order, every closed shard (a later one has started) whose tasks are done.
                while len(pending) > 1 and all(f.done() for f in pending[0].futures):
                    finalize(pending.popleft())
        while pending:
            finalize(pending.popleft())
    finally:
        if loader is not None:
            loader.shutdown(wait=True, cancel_futures=True)
        if fetcher is not None:
            fetcher.close()
        executor.shutdown(wait=True, cancel_futures=True)
        if bar is not None:
            bar.close()

    part_path = _job_part_path(root, cfg.job_index, cfg.num_jobs)
    storage(f"writing {part_path}", write_json, fs, part_path, {
        "job_index": cfg.job_index, "num_jobs": cfg.num_jobs, "rows": summary.rows,
        "shards": sorted(k for k in set(done) | set(written) if mine(k)),
    })
    summary.seconds = time.time() - t0
    summary.samples_per_second = processed_samples / max(summary.seconds, 1e-9)
    parts = [_job_part_path(root, i, cfg.num_jobs) for i in range(cfg.num_jobs)]
    if all(fs.exists(p) for p in parts):  # the last job to finish writes the one manifest
        storage("writing manifest.json", merge_manifests, cfg.output, cfg.storage_options)
        summary.manifest = join(cfg.output, MANIFEST_NAME)
    else:
        logger.info("job %d/%d done; manifest.json is written when every job has finished",
                    cfg.job_index, cfg.num_jobs)
    return summary


def _commit_shard(
    fs: Any, root: str, cfg: ShardJobConfig, ps: _PendingShard, results: list[RowResult], keys_seen: _LRU,
    digests_seen: _LRU,
) -> dict[str, Any]:
    """Dedupe one shard's results (in row order), write the shard, then its record (the commit)."""
    samples: list[ShardSample] = []
    bad: list[dict[str, Any]] = []
    repaired: Counter[str] = Counter()
    accepted_digests: list[tuple[str, int]] = []
    accepted_keys: list[tuple[str, int]] = []
    for r in results:
        reason, detail = r.bad, r.detail
        if reason is None and r.key is not None and keys_seen.get(r.key) is not None:
            reason, detail = im.DUPLICATE_KEY, f"key {r.key!r} already used by row {keys_seen.get(r.key)}"
        if reason is None and digests_seen.get(r.digest) is not None:
            reason = im.DUPLICATE_SAMPLE
            detail = f"same image and caption as row {digests_seen.get(r.digest)}"
        if reason is not None:
            bad.append({"row": r.row, "source_id": r.source_id, "reason": reason, "detail": detail})
            continue
        digests_seen.add(r.digest, r.row)
        accepted_digests.append((r.digest, r.row))
        if r.key is not None:
            keys_seen.add(r.key, r.row)
            accepted_keys.append((r.key, r.row))
        repaired.update(r.repairs)
        meta: dict[str, Any] = {"source": r.source_id, "width": r.width, "height": r.height,
                                "original_width": r.original_size[0], "original_height": r.original_size[1]}
        if r.repairs:
            meta["repairs"] = r.repairs
        if r.key is not None:
            meta["source_key"] = r.key
        samples.append(ShardSample(f"{r.row:012d}", r.jpeg, r.caption, meta))
    info = write_shard(fs, root, cfg.prefix, ps.index, samples) if samples else None
    rec = {"index": ps.index, "rows": list(ps.rows), "samples": len(samples),
           "shard": info.to_dict() if info else None, "bad": bad, "repaired": dict(sorted(repaired.items())),
           "dedupe": accepted_digests, "keys": accepted_keys}
    write_json(fs, _record_path(root, cfg.prefix, ps.index), rec)
    return rec


def merge_manifests(output: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Join the shard records of all jobs into ``manifest.json`` + ``bad_samples.jsonl`` (written last)."""
    fs, root = get_fs(output, storage_options)
    settings_path = join(root, WORK_DIR, "settings.json")
    if not fs.exists(settings_path):
        raise FileNotFoundError(f"{output} holds no shard job (no {WORK_DIR}/settings.json)")
    settings = read_json(fs, settings_path)
    n_jobs = settings["num_jobs"]
    missing = [i for i in range(n_jobs) if not fs.exists(_job_part_path(root, i, n_jobs))]
    if missing:
        raise RuntimeError(f"cannot merge {output}: job(s) {missing} of {n_jobs} have not finished")
    parts = [read_json(fs, _job_part_path(root, i, n_jobs)) for i in range(n_jobs)]
    prefix = settings["prefix"]
    shards: list[ShardInfo] = []
    bad: list[dict[str, Any]] = []
    reasons: Counter[str] = Counter()
    repaired: Counter[str] = Counter()
    for k in sorted(k for p in parts for k in p["shards"]):
        rec = read_json(fs, _record_path(root, prefix, k))
        if rec["shard"]:
            shards.append(ShardInfo(**rec["shard"]))
        bad.extend(rec["bad"])
        reasons.update(b["reason"] for b in rec["bad"])
        repaired.update(rec["repaired"])
    bad.sort(key=lambda b: b["row"])
    writer = {**settings, "rows": max((p["rows"] for p in parts), default=0)}
    manifest = build_manifest(shards, dict(reasons), dict(repaired), writer, prefix)
    write_manifest_and_report(fs, root, manifest, bad)
    return manifest


# ------------------------------------------------------------------------------------------------ CLI


# The fields that are not flags: storage_options comes from the --s3-* storage flags.
_NOT_FLAGS = ("storage_options",)


def _config_from_args(a: argparse.Namespace, storage_options: dict[str, Any]) -> ShardJobConfig:
    """The job config of the flags given (the others keep the dataclass defaults); a bad value raises a
    ValueError naming its flag."""
    names = {leaf.name for leaf in leaves(ShardJobConfig)} - set(_NOT_FLAGS)
    given = {k: v for k, v in vars(a).items() if k in names}
    if given.get("columns") is not None:
        # Split here, keeping empty names for validate() to refuse: configcli would drop them, and a dropped
        # name shifts every later column of a header-less file onto the wrong field.
        given["columns"] = [c.strip() for c in given["columns"].split(",")]
    return from_flat(ShardJobConfig, {**given, "storage_options": storage_options}, source="flags")


def _run_shard(a: argparse.Namespace, storage_options: dict[str, Any]) -> int:
    if getattr(a, "job_index", None) is None:  # Kubernetes indexed Jobs expose it as JOB_COMPLETION_INDEX
        env = os.environ.get("JOB_COMPLETION_INDEX", "0")
        if not env.isdigit():
            print(f"error: $JOB_COMPLETION_INDEX must be a non-negative integer (got {env!r})",
                  file=sys.stderr)
            return 2
        a.job_index = int(env)
    try:
        summary = run_shard_job(_config_from_args(a, storage_options))
    except OutputStorageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except (SourceError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary.text())
    return 0


def _run_merge(a: argparse.Namespace, storage_options: dict[str, Any]) -> int:
    try:
        m = merge_manifests(a.output, storage_options)
    except (FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t = m["totals"]
    print(f"manifest: {t['samples']} samples in {t['shards']} shards; {t['rejected']} rejected "
          f"(see {BAD_SAMPLES_NAME})")
    return 0


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Flags of our own and from ``configcli`` (whose help already shows the dataclass default, its argparse
    default being suppressed) alike: a required one says so instead of "default: None", the others show their
    default, and a help text that already explains its default is left as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required:
            return text if text.endswith("(required)") else f"{text} (required)"
        if "(default" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def add_cli_subcommands(sub: Any, add_storage_flags: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("shard", help="image-text sources → WebDataset shards + manifest",
                       description="Image-text sources → WebDataset shards, manifest.json and "
                                   "bad_samples.jsonl (resumable: rerun the same command after an "
                                   "interruption).",
                       formatter_class=_HelpFormatter)
    add_flags(p, ShardJobConfig, skip=_NOT_FLAGS)  # one flag per field, help and choices from its metadata
    add_storage_flags(p)
    p.set_defaults(run=_run_shard)
    m = sub.add_parser("merge-manifests", help="write manifest.json from the parts of a --num-jobs shard job",
                       formatter_class=_HelpFormatter)
    m.add_argument("--output", required=True, help="the output of the shard job (URL or path)")
    add_storage_flags(m)
    m.set_defaults(run=_run_merge)


__all__ = ["ShardJobConfig", "ShardSummary", "run_shard_job", "merge_manifests", "process_chunk", "fetch_url"]
