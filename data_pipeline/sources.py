"""Source readers: every supported input format streamed as ``SourceRow``s, one per image-text pair.

Tables (CSV/TSV/Parquet/JSONL) are read in chunks, never loaded whole. A source that does not exist, or a
table without the requested columns, raises ``SourceError`` naming it before any work starts. Rows that
are bad on their own (an unparseable JSONL line, an unsafe tar member) are yielded with ``bad`` set so that
they land in ``bad_samples.jsonl`` instead of stopping the job.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from data_pipeline.storage import expand_braces, get_fs
from data_pipeline.tarstream import IMAGE_EXTS, iter_tar

logger = logging.getLogger(__name__)

FORMATS = ("auto", "csv", "tsv", "parquet", "jsonl", "coco", "folder", "webdataset")
FOLDER_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
UNPARSEABLE_ROW = "unparseable_row"
csv.field_size_limit(2**31 - 1)


class SourceError(ValueError):
    """The source as a whole is unusable (missing, wrong columns, unknown format)."""


@dataclass
class SourceRow:
    source_id: str  # where the pair came from, for bad_samples.jsonl and the sample's .json
    image: str | bytes | None  # local path, fsspec/http(s) URL, or inline bytes (re-shard)
    caption: str | bytes | None  # str from text readers (surrogate-escaped), bytes from tars
    caption_path: str | None = None  # folder sources: the sidecar .txt, read by the worker
    key: str | None = None  # a key given by the source (checked for duplicates)
    bad: str | None = None  # reason when the source reader already rejected this row
    detail: str = ""


def _is_url(s: str) -> bool:
    return "://" in s


def _resolve(value: str, base: str) -> str:
    """A table's image reference: URL or absolute path as is, relative paths against the table's folder."""
    if _is_url(value) or value.startswith("/"):
        return value
    return posixpath.join(base, value) if base else value


def detect_format(source: str, storage_options: dict[str, Any] | None = None) -> str:
    fs, path = get_fs(source, storage_options)
    low = source.lower().split("?")[0]
    if "{" in source and ".tar" in low:
        return "webdataset"
    for ext, fmt in ((".csv", "csv"), (".tsv", "tsv"), (".parquet", "parquet"), (".pq", "parquet"),
                     (".jsonl", "jsonl"), (".tar", "webdataset")):
        if low.endswith(ext):
            return fmt
    if low.endswith(".json"):
        return "coco"
    if fs.isdir(path):
        return "webdataset" if fs.glob(path.rstrip("/") + "/*.tar") else "folder"
    raise SourceError(f"cannot tell the format of source {source!r}; pass --source-format")


class Source:
    """Validated source; iterate it for rows."""

    def __init__(
        self,
        source: str,
        fmt: str = "auto",
        image_column: str = "image",
        caption_column: str = "caption",
        key_column: str | None = None,
        image_root: str | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        if fmt not in FORMATS:
            raise SourceError(f"unknown source format {fmt!r}; choose one of {', '.join(FORMATS)}")
        self.source, self.opts = source, dict(storage_options or {})
        self.fs, self.path = get_fs(source, self.opts)
        if "{" not in source and not self.fs.exists(self.path):
            raise SourceError(f"source {source!r} does not exist")
        self.fmt = detect_format(source, self.opts) if fmt == "auto" else fmt
        self.image_column, self.caption_column, self.key_column = image_column, caption_column, key_column
        base = source.rsplit("/", 1)[0] if "/" in source else ""
        self.base = image_root if image_root is not None else base
        self._check()

    # -- validation (fails at once, naming the source)
    def _need(self, columns: list[str]) -> None:
        wanted = [self.image_column, self.caption_column] + ([self.key_column] if self.key_column else [])
        missing = [c for c in wanted if c not in columns]
        if missing:
            raise SourceError(
                f"source {self.source!r} has no column(s) {missing}; columns found: {columns}. "
                "Use --image-column/--caption-column to name them."
            )

    def _check(self) -> None:
        if self.fmt in ("csv", "tsv"):
            with self._text() as f:
                header = next(csv.reader(f, delimiter="\t" if self.fmt == "tsv" else ","), None)
            if header is None:
                raise SourceError(f"source {self.source!r} is empty (no header row)")
            self._need(header)
        elif self.fmt == "parquet":
            import pyarrow.parquet as pq

            with self.fs.open(self.path, "rb") as f:
                try:
                    names = pq.ParquetFile(f).schema_arrow.names
                except Exception as e:  # pyarrow raises several types for non-parquet input
                    raise SourceError(f"source {self.source!r} is not a readable Parquet file: {e}") from None
            self._need(names)
        elif self.fmt == "jsonl":
            with self.fs.open(self.path, "rb") as f:
                first = f.readline()
            try:
                obj = json.loads(first.decode("utf-8", "surrogateescape"))
            except json.JSONDecodeError as e:
                raise SourceError(f"source {self.source!r}: first line is not JSON ({e})") from None
            self._need(list(obj) if isinstance(obj, dict) else [])
        elif self.fmt == "coco":
            with self.fs.open(self.path, "rb") as f:
                try:
                    self._coco = json.loads(f.read())
                except json.JSONDecodeError as e:
                    raise SourceError(f"source {self.source!r} is not JSON: {e}") from None
            if not isinstance(self._coco, dict) or "annotations" not in self._coco or "images" not in self._coco:
                raise SourceError(f"source {self.source!r} is not a COCO captions file (needs 'annotations' and 'images')")
        elif self.fmt == "webdataset":
            if not self._tars():
                raise SourceError(f"source {self.source!r} holds no .tar shards")

    def _text(self) -> io.TextIOWrapper:
        # surrogateescape keeps undecodable caption bytes so the worker can reject exactly that row.
        return io.TextIOWrapper(self.fs.open(self.path, "rb"), encoding="utf-8", errors="surrogateescape", newline="")

    def _tars(self) -> list[str]:
        if "{" in self.source:
            return expand_braces(self.source)
        if self.fs.isdir(self.path):
            proto = self.source.split("://", 1)[0] + "://" if _is_url(self.source) else ""
            return [proto + p if proto and not p.startswith(proto) else p
                    for p in sorted(self.fs.glob(self.path.rstrip("/") + "/*.tar"))]
        return [self.source]

    # -- rows
    def __iter__(self) -> Iterator[SourceRow]:
        return getattr(self, f"_iter_{self.fmt}")()

    def _iter_table_rows(self, rows: Iterator[dict[str, Any]], name: str) -> Iterator[SourceRow]:
        for i, row in enumerate(rows):
            sid = f"{name}:row{i}"
            if row is None:
                yield SourceRow(sid, None, None, bad=UNPARSEABLE_ROW)
                continue
            img = row.get(self.image_column)
            cap = row.get(self.caption_column)
            key = None if not self.key_column else (None if row.get(self.key_column) is None else str(row[self.key_column]))
            image = _resolve(str(img), self.base) if isinstance(img, str) and img else None
            if isinstance(img, bytes):
                image = img  # Parquet with embedded image bytes
            yield SourceRow(sid, image, cap, key=key)

    def _iter_csv(self, delimiter: str = ",") -> Iterator[SourceRow]:
        name = posixpath.basename(self.path)
        with self._text() as f:
            yield from self._iter_table_rows(csv.DictReader(f, delimiter=delimiter), name)

    def _iter_tsv(self) -> Iterator[SourceRow]:
        return self._iter_csv("\t")

    def _iter_jsonl(self) -> Iterator[SourceRow]:
        def rows() -> Iterator[dict[str, Any] | None]:
            with self.fs.open(self.path, "rb") as f:
                for line in f:
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line.decode("utf-8", "surrogateescape"))
                    except json.JSONDecodeError:
                        obj = None
                    yield obj if isinstance(obj, dict) else None

        yield from self._iter_table_rows(rows(), posixpath.basename(self.path))

    def _iter_parquet(self) -> Iterator[SourceRow]:
        import pyarrow.parquet as pq

        cols = [self.image_column, self.caption_column] + ([self.key_column] if self.key_column else [])

        def rows() -> Iterator[dict[str, Any]]:
            with self.fs.open(self.path, "rb") as f:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=8192, columns=cols):
                    yield from batch.to_pylist()

        yield from self._iter_table_rows(rows(), posixpath.basename(self.path))

    def _iter_coco(self) -> Iterator[SourceRow]:
        files = {img["id"]: img["file_name"] for img in self._coco["images"]}
        for i, ann in enumerate(self._coco["annotations"]):
            sid = f"coco:annotation{ann.get('id', i)}"
            fname = files.get(ann.get("image_id"))
            if fname is None:
                yield SourceRow(sid, None, None, bad="missing_file", detail=f"image_id {ann.get('image_id')} not in 'images'")
                continue
            yield SourceRow(sid, _resolve(fname, self.base), ann.get("caption"),
                            key=str(ann["id"]) if "id" in ann else None)

    def _iter_folder(self) -> Iterator[SourceRow]:
        proto = self.source.split("://", 1)[0] + "://" if _is_url(self.source) else ""
        for p in sorted(self.fs.find(self.path)):
            stem, ext = posixpath.splitext(p)
            if ext.lower() not in FOLDER_IMAGE_EXTS:
                continue
            rel = p[len(self.path.rstrip("/")) + 1 :]
            yield SourceRow(f"folder:{rel}", proto + p if proto else p, None, caption_path=(proto + stem if proto else stem) + ".txt")

    def _iter_webdataset(self) -> Iterator[SourceRow]:
        for url in self._tars():
            name = posixpath.basename(url)
            problems: list[tuple[str, str]] = []
            try:
                fs, path = get_fs(url, self.opts)
                def on_bad(reason: str, detail: str, _problems: list = problems) -> None:
                    _problems.append((reason, detail))

                with fs.open(path, "rb") as f:
                    for raw in iter_tar(f, name, on_bad):
                        for r, d in problems:
                            yield SourceRow(f"{name}:?", None, None, bad=r, detail=d)
                        problems.clear()
                        image = next((raw.members[e] for e in IMAGE_EXTS if e in raw.members), None)
                        if image is None:
                            yield SourceRow(f"{name}:{raw.key}", None, None, bad="missing_file", detail="no image member")
                            continue
                        yield SourceRow(f"{name}:{raw.key}", image, raw.members.get("txt"), key=raw.key)
            except FileNotFoundError:
                problems.append(("missing_file", f"{url} does not exist"))
            for r, d in problems:
                yield SourceRow(f"{name}:?", None, None, bad=r, detail=d)
