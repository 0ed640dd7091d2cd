"""Source readers: every supported input format streamed as ``SourceRow``s, one per image-text pair.

Tables (CSV/TSV/Parquet/JSONL) are read in chunks, never loaded whole. A source that does not exist, or a
table without the requested columns, raises ``SourceError`` naming it before any work starts. Rows that
are bad on their own (an unparseable JSONL line, an unsafe tar member) are yielded with ``bad`` set so that
they land in ``bad_samples.jsonl`` instead of stopping the job.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
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

FORMATS = ("auto", "csv", "tsv", "parquet", "jsonl", "coco", "vg", "folder", "webdataset")
TABLE_FORMATS = ("csv", "tsv", "parquet", "jsonl")
TABLE_EXTS = {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl"}
FOLDER_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
UNPARSEABLE_ROW = "unparseable_row"
UNREADABLE_PART = "unreadable_part"  # a table part (or the rest of it) that cannot be read
csv.field_size_limit(2**31 - 1)


class SourceError(ValueError):
    """The source as a whole is unusable (missing, wrong columns, unknown format)."""


@dataclass
class SourceRow:
    source_id: str  # where the pair came from, for bad_samples.jsonl and the sample's .json
    image: str | bytes | None  # local path, fsspec/http(s) URL, or inline bytes (re-shard)
    caption: Any  # str from text readers (surrogate-escaped), bytes from tars; anything else is rejected
    caption_path: str | None = None  # folder sources: the sidecar .txt, read by the worker
    key: str | None = None  # a key given by the source (checked for duplicates)
    bad: str | None = None  # reason when the source reader already rejected this row
    detail: str = ""


def _is_url(s: str) -> bool:
    return "://" in s


def _is_glob(s: str) -> bool:
    return any(c in s for c in "*?[")


def _resolve(value: str, base: str) -> str:
    """A table's image reference: URL or absolute path as is, relative paths against the table's folder."""
    if _is_url(value) or value.startswith("/"):
        return value
    return posixpath.join(base, value) if base else value


def _table_format(name: str) -> str | None:
    low = name.lower().split("?")[0]
    return next((fmt for ext, fmt in TABLE_EXTS.items() if low.endswith(ext)), None)


def _first_char(fs: Any, path: str) -> str:
    with fs.open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head[:1].decode("ascii", "replace")


def detect_format(source: str, storage_options: dict[str, Any] | None = None) -> str:
    fs, path = get_fs(source, storage_options)
    low = source.lower().split("?")[0]
    if "{" in source and ".tar" in low:
        return "webdataset"
    if _is_glob(source):
        fmts = {_table_format(p) or ("webdataset" if p.endswith(".tar") else None) for p in fs.glob(path)}
        if len(fmts) == 1 and None not in fmts:
            return fmts.pop()
        raise SourceError(f"source {source!r}: the files it matches are not all of one table format "
                          f"({sorted(str(f) for f in fmts)}); pass --source-format")
    fmt = _table_format(low)
    if fmt:
        return fmt
    if low.endswith(".tar"):
        return "webdataset"
    if low.endswith(".json"):
        # COCO captions is an object; Visual Genome's region_descriptions.json is a list of images.
        return "vg" if _first_char(fs, path) == "[" else "coco"
    if fs.isdir(path):
        if fs.glob(path.rstrip("/") + "/*.tar"):
            return "webdataset"
        fmts = {_table_format(p) for p in fs.ls(path, detail=False)} - {None}
        if len(fmts) > 1:
            raise SourceError(f"folder {source!r} holds tables of several formats {sorted(fmts)}; "
                              "pass --source-format or a glob")
        return fmts.pop() if fmts else "folder"
    raise SourceError(f"cannot tell the format of source {source!r}; pass --source-format")


def iter_json_array(f: Any, chunk: int = 1 << 20) -> Iterator[Any]:
    """Elements of a top-level JSON array, parsed incrementally: a multi-GB file never sits in memory."""
    dec = json.JSONDecoder()
    text = codecs.getincrementaldecoder("utf-8")("surrogateescape")
    buf, pos, eof = "", 0, False

    def more() -> None:
        nonlocal buf, pos, eof
        data = f.read(max(chunk, len(buf) - pos))  # grows with an element that does not fit
        if not data:
            eof = True
        buf, pos = buf[pos:] + text.decode(data, final=eof), 0

    def skip() -> bool:  # to the next non-blank character; False at the end of the file
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n\ufeff":
                pos += 1
            if pos < len(buf):
                return True
            if eof:
                return False
            more()

    if not skip() or buf[pos] != "[":
        raise ValueError("not a JSON array")
    pos += 1
    while skip():
        c = buf[pos]
        if c == "]":
            return
        if c == ",":
            pos += 1
            continue
        try:
            obj, end = dec.raw_decode(buf, pos)
        except json.JSONDecodeError:
            if eof:
                raise
            more()
            continue
        if end == len(buf) and not eof:  # a bare number may go on in the next chunk
            more()
            continue
        pos = end
        yield obj
    raise ValueError("JSON array not closed (file cut short?)")


class Source:
    """Validated source; iterate it for rows.

    Table sources may be one file or many parts (a folder or a glob): parts are read in sorted order, so
    row numbers (and with them shard contents and sample keys) are the same on every run; a row's
    ``source_id`` is ``{part path relative to the source}:row{i}``.
    """

    def __init__(
        self,
        source: str,
        fmt: str = "auto",
        image_column: str = "image",
        caption_column: str = "caption",
        key_column: str | None = None,
        image_root: str | None = None,
        storage_options: dict[str, Any] | None = None,
        columns: list[str] | None = None,
        vg_max_regions: int = 10,
    ) -> None:
        if fmt not in FORMATS:
            raise SourceError(f"unknown source format {fmt!r}; choose one of {', '.join(FORMATS)}")
        self.source, self.opts = source, dict(storage_options or {})
        self.fs, self.path = get_fs(source, self.opts)
        if "{" not in source and not _is_glob(source) and not self.fs.exists(self.path):
            raise SourceError(f"source {source!r} does not exist")
        self.fmt = detect_format(source, self.opts) if fmt == "auto" else fmt
        self.image_column, self.caption_column, self.key_column = image_column, caption_column, key_column
        self.columns, self.vg_max_regions = columns, vg_max_regions
        if columns is not None and self.fmt not in ("csv", "tsv"):
            raise SourceError(f"--columns names the fields of a header-less CSV/TSV; source {source!r} is "
                              f"{self.fmt}")
        self.proto = source.split("://", 1)[0] + "://" if _is_url(source) else ""
        self.image_root = image_root
        self.parts: list[tuple[str, str]] = []  # table formats: (path, name relative to the source)
        if self.fmt in TABLE_FORMATS:
            self.parts = self._table_parts()
        self._check()

    # -- parts
    def _table_parts(self) -> list[tuple[str, str]]:
        if _is_glob(self.source):
            paths = sorted(self.fs.glob(self.path))
            prefix = self.path[: min(self.path.find(c) % (len(self.path) + 1) for c in "*?[")]
            base = posixpath.dirname(prefix)  # the folder above the first wildcard
        elif self.fs.isdir(self.path):
            paths = sorted(p for p in self.fs.find(self.path) if _table_format(p) == self.fmt)
            base = self.path.rstrip("/")
        else:
            return [(self.path, posixpath.basename(self.path))]
        paths = [p for p in paths if not self.fs.isdir(p)]
        if not paths:
            raise SourceError(f"source {self.source!r} holds no {self.fmt} parts")
        return [(p, p[len(base) + 1 :] if base and p.startswith(base + "/") else posixpath.basename(p))
                for p in paths]

    def identity(self) -> dict[str, Any]:
        """What a relaunch must find unchanged: the list of parts of a multi-part source."""
        if len(self.parts) <= 1 and not self.fs.isdir(self.path):
            return {}
        h = hashlib.sha256("\n".join(name for _, name in self.parts).encode()).hexdigest()
        return {"source_parts": len(self.parts), "source_parts_sha256": h}

    def _base(self, part_path: str) -> str:
        if self.image_root is not None:
            return self.image_root
        d = posixpath.dirname(part_path)
        return self.proto + d if self.proto and d and not d.startswith(self.proto) else d

    # -- validation (fails at once, naming the source)
    def _need(self, columns: list[str], where: str) -> None:
        wanted = [self.image_column, self.caption_column] + ([self.key_column] if self.key_column else [])
        missing = [c for c in wanted if c not in columns]
        if missing:
            how = ("--columns" if self.columns is not None
                   else "--image-column/--caption-column (or --columns for a file without a header row)")
            raise SourceError(f"source {where!r} has no column(s) {missing}; columns found: {columns}. "
                              f"Use {how} to name them.")

    def _check_part(self, path: str, where: str) -> None:
        if self.fmt in ("csv", "tsv"):
            if self.columns is not None:
                self._need(self.columns, where)
                return
            with self._text(path) as f:
                header = next(csv.reader(f, delimiter="\t" if self.fmt == "tsv" else ","), None)
            if header is None:
                raise SourceError(f"source {where!r} is empty (no header row)")
            self._need(header, where)
        elif self.fmt == "parquet":
            import pyarrow.parquet as pq

            with self.fs.open(path, "rb") as f:
                try:
                    names = pq.ParquetFile(f).schema_arrow.names
                except Exception as e:  # pyarrow raises several types for non-parquet input
                    raise SourceError(f"source {where!r} is not a readable Parquet file: {e}") from None
            self._need(names, where)
        elif self.fmt == "jsonl":
            with self.fs.open(path, "rb") as f:
                first = f.readline()
            try:
                obj = json.loads(first.decode("utf-8", "surrogateescape"))
            except json.JSONDecodeError as e:
                raise SourceError(f"source {where!r}: first line is not JSON ({e})") from None
            self._need(list(obj) if isinstance(obj, dict) else [], where)

    def _check(self) -> None:
        if self.fmt in TABLE_FORMATS:
            # The first part now (a typo in a column name fails at once); later parts when they are reached.
            path, name = self.parts[0]
            self._check_part(path, self.source if len(self.parts) == 1 else f"{self.source} ({name})")
        elif self.fmt == "coco":
            with self.fs.open(self.path, "rb") as f:
                try:
                    self._coco = json.loads(f.read())
                except json.JSONDecodeError as e:
                    raise SourceError(f"source {self.source!r} is not JSON: {e}") from None
            coco = self._coco
            if not isinstance(coco, dict) or "annotations" not in coco or "images" not in coco:
                raise SourceError(f"source {self.source!r} is not a COCO captions file "
                                  "(needs 'annotations' and 'images')")
        elif self.fmt == "vg":
            if self.fs.isdir(self.path) or _first_char(self.fs, self.path) != "[":
                raise SourceError(f"source {self.source!r} is not a Visual Genome region_descriptions.json "
                                  "(a JSON list of {'id', 'regions': [{'phrase', ...}]})")
            root = self.image_root if self.image_root is not None else self._base(self.path)
            rfs, rpath = get_fs(root, self.opts) if root else (self.fs, "")
            if not root or not rfs.isdir(rpath):
                raise SourceError(f"--image-root {root!r} (the folder of the VG images) does not exist")
        elif self.fmt == "webdataset":
            if not self._tars():
                raise SourceError(f"source {self.source!r} holds no .tar shards")

    def _text(self, path: str | None = None) -> io.TextIOWrapper:
        # surrogateescape keeps undecodable caption bytes so the worker can reject exactly that row.
        return io.TextIOWrapper(self.fs.open(path or self.path, "rb"), encoding="utf-8",
                                errors="surrogateescape", newline="")

    def _tars(self) -> list[str]:
        if "{" in self.source:
            return expand_braces(self.source)
        if _is_glob(self.source):
            return [self.proto + p if self.proto else p for p in sorted(self.fs.glob(self.path))]
        if self.fs.isdir(self.path):
            return [self.proto + p if self.proto and not p.startswith(self.proto) else p
                    for p in sorted(self.fs.glob(self.path.rstrip("/") + "/*.tar"))]
        return [self.source]

    # -- rows
    def __iter__(self) -> Iterator[SourceRow]:
        if self.fmt in TABLE_FORMATS:
            return self._iter_parts()
        return getattr(self, f"_iter_{self.fmt}")()

    def _iter_parts(self) -> Iterator[SourceRow]:
        reader = getattr(self, f"_rows_{self.fmt}")
        for n, (path, name) in enumerate(self.parts):
            base = self._base(path)
            i = 0
            try:
                if n:
                    self._check_part(path, f"{self.source} ({name})")
                for i, row in enumerate(reader(path)):  # noqa: B007 - i is reported after a failure
                    yield self._table_row(row, f"{name}:row{i}", base)
            except Exception as e:  # a part that cannot be read (or stops being readable) ends, not the job
                logger.warning("source part %s unreadable after %d rows: %s", name, i, e)
                yield SourceRow(f"{name}:?", None, None, bad=UNREADABLE_PART,
                                detail=f"{type(e).__name__}: {e}")

    def _table_row(self, row: dict[str, Any] | str | None, sid: str, base: str) -> SourceRow:
        if not isinstance(row, dict):
            return SourceRow(sid, None, None, bad=UNPARSEABLE_ROW, detail=row if isinstance(row, str) else "")
        img = row.get(self.image_column)
        cap = row.get(self.caption_column)
        key = None
        if self.key_column and row.get(self.key_column) is not None:
            key = str(row[self.key_column])
        if isinstance(img, bytes):
            return SourceRow(sid, img, cap, key=key)  # Parquet with embedded image bytes
        if isinstance(img, str) and img.strip():
            return SourceRow(sid, _resolve(img.strip(), base), cap, key=key)
        detail = ("no image reference" if img is None or img == ""
                  else f"image column holds a {type(img).__name__}")
        return SourceRow(sid, None, cap, key=key, bad="bad_image_reference" if img not in (None, "") else
                         "missing_file", detail=detail)

    def _rows_csv(self, path: str, delimiter: str = ",") -> Iterator[dict[str, Any] | str | None]:
        with self._text(path) as f:
            reader = csv.reader(f, delimiter=delimiter)
            names = self.columns
            if names is None:
                names = next(reader, None) or []
            while True:
                try:
                    fields = next(reader)
                except StopIteration:
                    return
                except csv.Error as e:
                    yield f"line {reader.line_num}: {e}"
                    continue
                if not fields:
                    continue  # blank line
                if self.columns is not None and len(fields) != len(names):
                    yield f"line {reader.line_num}: {len(fields)} fields, --columns names {len(names)}"
                    continue
                yield dict(zip(names, fields, strict=False))

    def _rows_tsv(self, path: str) -> Iterator[dict[str, Any] | str | None]:
        return self._rows_csv(path, "\t")

    def _rows_jsonl(self, path: str) -> Iterator[dict[str, Any] | str | None]:
        with self.fs.open(path, "rb") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line.decode("utf-8", "surrogateescape"))
                except json.JSONDecodeError as e:
                    yield f"line {n}: {e}"
                    continue
                yield obj if isinstance(obj, dict) else (
                    f"line {n}: a JSON {type(obj).__name__}, not an object")

    def _rows_parquet(self, path: str) -> Iterator[dict[str, Any] | str | None]:
        import pyarrow.parquet as pq

        cols = [self.image_column, self.caption_column] + ([self.key_column] if self.key_column else [])
        with self.fs.open(path, "rb") as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=8192, columns=cols):
                yield from batch.to_pylist()

    def _iter_coco(self) -> Iterator[SourceRow]:
        base = self._base(self.path)
        files = {img["id"]: img["file_name"] for img in self._coco["images"]
                 if isinstance(img, dict) and "id" in img and isinstance(img.get("file_name"), str)}
        for i, ann in enumerate(self._coco["annotations"]):
            if not isinstance(ann, dict):
                yield SourceRow(f"coco:annotation#{i}", None, None, bad=UNPARSEABLE_ROW,
                                detail="not an object")
                continue
            sid = f"coco:annotation{ann.get('id', i)}"
            fname = files.get(ann.get("image_id"))
            if fname is None:
                yield SourceRow(sid, None, None, bad="missing_file",
                                detail=f"image_id {ann.get('image_id')} not in 'images'")
                continue
            yield SourceRow(sid, _resolve(fname, base), ann.get("caption"),
                            key=str(ann["id"]) if "id" in ann else None)

    def _vg_index(self) -> dict[str, str]:
        """Image id → path for every image under the VG image root (VG_100K/ and VG_100K_2/ alike)."""
        root = self.image_root if self.image_root is not None else self._base(self.path)
        fs, rpath = get_fs(root, self.opts)
        proto = root.split("://", 1)[0] + "://" if _is_url(root) else ""
        out: dict[str, str] = {}
        for p in sorted(fs.find(rpath)):
            stem, ext = posixpath.splitext(posixpath.basename(p))
            if ext.lower() in FOLDER_IMAGE_EXTS:
                out.setdefault(stem, proto + p if proto and not p.startswith(proto) else p)
        return out

    def _iter_vg(self) -> Iterator[SourceRow]:
        """One pair per region phrase (the whole image with the phrase), at most ``vg_max_regions`` per
        image."""
        images = self._vg_index()
        with self.fs.open(self.path, "rb") as f:
            i = -1
            try:
                for i, entry in enumerate(iter_json_array(f)):
                    regions = entry.get("regions") if isinstance(entry, dict) else None
                    image_id = entry.get("id", entry.get("image_id")) if isinstance(entry, dict) else None
                    if image_id is None and regions and isinstance(regions[0], dict):
                        image_id = regions[0].get("image_id")
                    if image_id is None or not isinstance(regions, list):
                        yield SourceRow(f"vg:entry{i}", None, None, bad=UNPARSEABLE_ROW,
                                        detail="needs 'id' and a 'regions' list")
                        continue
                    path = images.get(str(image_id))
                    for j, reg in enumerate(regions[: self.vg_max_regions]):
                        rid = reg.get("region_id", j) if isinstance(reg, dict) else j
                        sid = f"vg:image{image_id}:region{rid}"
                        if not isinstance(reg, dict):
                            yield SourceRow(sid, None, None, bad=UNPARSEABLE_ROW,
                                            detail="region is not an object")
                        elif path is None:
                            yield SourceRow(sid, None, None, bad="missing_file",
                                            detail=f"no image {image_id}.* under the image root")
                        else:
                            yield SourceRow(sid, path, reg.get("phrase"))
            except (ValueError, UnicodeDecodeError) as e:
                yield SourceRow(f"vg:entry{i + 1}", None, None, bad=UNPARSEABLE_ROW,
                                detail=f"{self.source}: {e}; the rest of the file is skipped")

    def _iter_folder(self) -> Iterator[SourceRow]:
        proto = self.proto
        for p in sorted(self.fs.find(self.path)):
            stem, ext = posixpath.splitext(p)
            if ext.lower() not in FOLDER_IMAGE_EXTS:
                continue
            rel = p[len(self.path.rstrip("/")) + 1 :]
            yield SourceRow(f"folder:{rel}", proto + p if proto else p, None,
                            caption_path=(proto + stem if proto else stem) + ".txt")

    def _iter_webdataset(self) -> Iterator[SourceRow]:
        tars = self._tars()
        # Keys are made unique across tars by the tar's path relative to the tars' common folder: two
        # img2dataset runs both have a 00000.tar with key 000000000, and both samples are kept.
        common = posixpath.commonpath([posixpath.dirname(t) for t in tars]) if len(tars) > 1 else None
        for url in tars:
            name = posixpath.basename(url)
            rel = url[len(common) + 1 :] if common and url.startswith(common + "/") else name
            stem = rel[: -len(".tar")] if rel.endswith(".tar") else rel
            problems: list[tuple[str, str]] = []

            def on_bad(reason: str, detail: str, _problems: list = problems) -> None:
                _problems.append((reason, detail))

            try:
                fs, path = get_fs(url, self.opts)
                with fs.open(path, "rb") as f:
                    for raw in iter_tar(f, rel, on_bad):
                        for r, d in problems:
                            yield SourceRow(f"{rel}:?", None, None, bad=r, detail=d)
                        problems.clear()
                        image = next((raw.members[e] for e in IMAGE_EXTS if e in raw.members), None)
                        if image is None:
                            yield SourceRow(f"{rel}:{raw.key}", None, None, bad="missing_file",
                                            detail="no image member")
                            continue
                        yield SourceRow(f"{rel}:{raw.key}", image, raw.members.get("txt"),
                                        key=f"{stem}/{raw.key}")
            except FileNotFoundError:
                problems.append(("missing_file", f"{url} does not exist"))
            except Exception as e:  # an unreadable tar is one bad input, not the end of the job
                problems.append(("unreadable_shard", f"{url}: {type(e).__name__}: {e}"))
            for r, d in problems:
                yield SourceRow(f"{rel}:?", None, None, bad=r, detail=d)
