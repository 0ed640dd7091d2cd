"""Shard writer and manifest: the on-storage contract of ARCHITECTURE.md ("Shards").

A shard ``{prefix}-{index:06d}.tar`` holds, per sample, ``{key}.jpg`` (RGB JPEG), ``{key}.txt`` (UTF-8
caption) and ``{key}.json`` (at least ``key, source, width, height, sha256``, plus ``txt_sha256``: the
sha256 of the jpg and of the caption bytes, which the loader checks before it uses a sample; shards written
before ``txt_sha256`` existed stay loadable, only their jpg is checked). ``manifest.json`` at the
output root lists every shard with its sample count, byte size and sha256, the totals and the writer
settings; ``bad_samples.jsonl`` has one line per rejected input. Tars are built in memory with fixed
metadata (mtime 0, uid 0), so the same samples always give byte-identical shards (resume compares equal).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from fsspec import AbstractFileSystem

from data_pipeline.storage import atomic_write_bytes, join, write_json

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
BAD_SAMPLES_NAME = "bad_samples.jsonl"
FORMAT_NAME = "soho-webdataset"
FORMAT_VERSION = 1


@dataclass
class ShardSample:
    """One image-text pair ready to be written."""

    key: str
    jpeg: bytes
    caption: str
    meta: dict[str, Any]  # merged into {key}.json; key/sha256 are filled in by the writer


@dataclass
class ShardInfo:
    name: str
    samples: int
    bytes: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "samples": self.samples, "bytes": self.bytes, "sha256": self.sha256}


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def build_shard_bytes(samples: Iterable[ShardSample]) -> tuple[bytes, int]:
    """Serialise samples to an uncompressed tar in memory; returns (bytes, sample count)."""
    buf = io.BytesIO()
    n = 0
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:
            meta = dict(s.meta)
            meta["key"] = s.key
            caption = s.caption.encode("utf-8")
            meta["sha256"] = hashlib.sha256(s.jpeg).hexdigest()
            meta["txt_sha256"] = hashlib.sha256(caption).hexdigest()
            _add_member(tar, f"{s.key}.jpg", s.jpeg)
            _add_member(tar, f"{s.key}.txt", caption)
            _add_member(tar, f"{s.key}.json", json.dumps(meta, sort_keys=True).encode("utf-8"))
            n += 1
    return buf.getvalue(), n


def write_shard(
    fs: AbstractFileSystem, root: str, prefix: str, index: int, samples: Iterable[ShardSample]
) -> ShardInfo:
    """Build one shard and commit it atomically under ``root``."""
    data, n = build_shard_bytes(samples)
    name = shard_name(prefix, index)
    atomic_write_bytes(fs, join(root, name), data)
    return ShardInfo(name=name, samples=n, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())


def build_manifest(
    shards: list[ShardInfo],
    rejected_by_reason: dict[str, int],
    repaired_by_kind: dict[str, int],
    writer_settings: dict[str, Any],
    prefix: str,
) -> dict[str, Any]:
    shards = sorted((s for s in shards if s.samples > 0), key=lambda s: s.name)
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "prefix": prefix,
        "shards": [s.to_dict() for s in shards],
        "totals": {
            "shards": len(shards),
            "samples": sum(s.samples for s in shards),
            "bytes": sum(s.bytes for s in shards),
            "rejected": sum(rejected_by_reason.values()),
            "rejected_by_reason": dict(sorted(rejected_by_reason.items())),
            "repaired": sum(repaired_by_kind.values()),
            "repaired_by_kind": dict(sorted(repaired_by_kind.items())),
        },
        "writer": writer_settings,
    }


def write_manifest_and_report(
    fs: AbstractFileSystem, root: str, manifest: dict[str, Any], bad_samples: list[dict[str, Any]]
) -> None:
    """Write bad_samples.jsonl, then manifest.json last: a manifest means the dataset is complete."""
    lines = "".join(json.dumps(b, sort_keys=True) + "\n" for b in bad_samples)
    atomic_write_bytes(fs, join(root, BAD_SAMPLES_NAME), lines.encode("utf-8"))
    write_json(fs, join(root, MANIFEST_NAME), manifest)


class ShardWriter:
    """Sequential writer for in-process producers (synthetic scenes): add samples, then ``close()``.

    The parallel ``shard`` job uses the same ``write_shard``/``build_manifest`` functions directly.
    """

    def __init__(
        self,
        fs: AbstractFileSystem,
        root: str,
        samples_per_shard: int,
        prefix: str = "shards",
        writer_settings: dict[str, Any] | None = None,
    ) -> None:
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be ≥ 1, got {samples_per_shard}")
        self.fs, self.root, self.prefix = fs, root, prefix
        self.samples_per_shard = samples_per_shard
        self.settings = dict(writer_settings or {})
        self.settings.setdefault("samples_per_shard", samples_per_shard)
        self._pending: list[ShardSample] = []
        self.shards: list[ShardInfo] = []
        self.bad: list[dict[str, Any]] = []
        self.repaired: dict[str, int] = {}
        fs.makedirs(root, exist_ok=True)

    def add(self, sample: ShardSample) -> None:
        self._pending.append(sample)
        if len(self._pending) >= self.samples_per_shard:
            self._flush()

    def reject(self, source_id: str, reason: str, detail: str = "") -> None:
        self.bad.append({"source_id": source_id, "reason": reason, "detail": detail})

    def _flush(self) -> None:
        if self._pending:
            self.shards.append(write_shard(self.fs, self.root, self.prefix, len(self.shards), self._pending))
            self._pending = []

    def close(self) -> dict[str, Any]:
        self._flush()
        reasons: dict[str, int] = {}
        for b in self.bad:
            reasons[b["reason"]] = reasons.get(b["reason"], 0) + 1
        manifest = build_manifest(self.shards, reasons, self.repaired, self.settings, self.prefix)
        write_manifest_and_report(self.fs, self.root, manifest, self.bad)
        return manifest
