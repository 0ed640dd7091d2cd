"""Safe, streaming reading of WebDataset tars (ours and img2dataset's).

Members are grouped into samples by key (the member path up to the first dot of its file name), read
sequentially (no seeking, so it works on s3 streams), never extracted to disk, and only the extensions we
decode are kept: images, ``txt``, ``json``. Pickles and other members are ignored, never loaded. Member
names that are absolute or contain ``..`` are rejected: nothing from outside may be trusted as a path.
``HashingReader`` hashes and counts the bytes as they stream past, so a shard's sha256 and size can be
compared with its manifest entry without a second read.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO

logger = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
KEEP_EXTS = frozenset((*IMAGE_EXTS, "txt", "json"))

TRUNCATED_TAR = "truncated_tar"
UNREADABLE_SHARD = "unreadable_shard"
UNSAFE_MEMBER = "unsafe_member_name"


@dataclass
class RawSample:
    key: str
    shard: str
    members: dict[str, bytes] = field(default_factory=dict)  # extension (lower case) → bytes

    def image_bytes(self) -> bytes | None:
        for ext in IMAGE_EXTS:
            if ext in self.members:
                return self.members[ext]
        return None


class HashingReader:
    """A read-only stream wrapper: every byte read passes through sha256 and is counted."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self._h = hashlib.sha256()
        self.nbytes = 0

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._h.update(data)
        self.nbytes += len(data)
        return data

    def drain(self, chunk: int = 2**20) -> None:
        """Read (and hash) whatever the tar reader left unread: the end-of-archive blocks and padding."""
        while self.read(chunk):
            pass

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def is_unsafe_name(name: str) -> bool:
    parts = name.replace("\\", "/").split("/")
    return name.startswith(("/", "\\")) or ".." in parts or (len(name) > 1 and name[1] == ":")


def split_key(name: str) -> tuple[str, str]:
    """'dir/abc.seg.jpg' → ('dir/abc', 'seg.jpg'): WebDataset's key/extension convention."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :].lower()


class _TarError(Exception):
    pass


def _octal(field: bytes) -> int:
    field = field.rstrip(b"\0 ").lstrip(b" ")
    if not field:
        return 0
    if field[0] & 0x80:  # GNU base-256 for sizes ≥ 8 GiB
        return int.from_bytes(field[1:], "big")
    try:
        return int(field, 8)
    except ValueError:
        raise _TarError(f"bad octal field {field!r}") from None


def _read_exact(f: IO[bytes], n: int) -> bytes:
    data = f.read(n)
    while len(data) < n:
        more = f.read(n - len(data))
        if not more:
            raise _TarError(f"unexpected end of data ({len(data)} of {n} bytes)")
        data += more
    return data


def _members(f: IO[bytes]) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """(name, read body) of each regular file, sequentially; the caller must call ``read`` once.

    A small reader of our own instead of ``tarfile``'s stream mode: ~15× less CPU per member on the
    loader's hot path. Handles ustar (with name prefix), GNU long names and pax path records.
    """
    long_name: str | None = None
    while True:
        header = f.read(512)
        if not header or header == b"\0" * 512:
            return  # end of archive (two zero blocks, or EOF right at a member boundary)
        if len(header) < 512:
            header += _read_exact(f, 512 - len(header))
        stored = _octal(header[148:156])
        computed = sum(header[:148]) + 8 * 32 + sum(header[156:])
        if stored != computed:
            raise _TarError("header checksum mismatch")
        size = _octal(header[124:136])
        kind = header[156:157]
        name = header[:100].split(b"\0", 1)[0]
        if header[257:262] == b"ustar" and header[345:500].strip(b"\0"):
            name = header[345:500].split(b"\0", 1)[0] + b"/" + name
        is_file = kind in (b"0", b"\0", b"7")
        if is_file:
            full = long_name if long_name is not None else name.decode("utf-8", "surrogateescape")
            long_name = None
            # The caller sees the name before the body is read, so a sample that ended with the previous
            # member is complete even if this body turns out to be cut short.
            yield full, lambda size=size: _read_body(f, size)
            continue
        data = _read_body(f, size)
        if kind == b"L":  # GNU long name for the next member
            long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            continue
        if kind == b"x":  # pax extended header: may carry the next member's path
            for rec in data.split(b"\n"):
                _, _, kv = rec.partition(b" ")
                if kv.startswith(b"path="):
                    long_name = kv[5:].decode("utf-8", "surrogateescape")
            continue
        # other kinds (directories, links, global pax headers) carry no sample data


def _read_body(f: IO[bytes], size: int) -> bytes:
    data = _read_exact(f, size) if size else b""
    pad = (-size) % 512
    if pad:
        _read_exact(f, pad)
    return data


def iter_tar(fileobj: IO[bytes], shard: str, on_bad: Callable[[str, str], None]) -> Iterator[RawSample]:
    """Yield samples of one tar stream; problems are reported via ``on_bad(reason, detail)``, never raised.

    A truncated or corrupt tar yields every complete sample before the damage (also when the cut falls in
    a member header); a sample whose member body is cut is dropped.
    """
    current: RawSample | None = None
    try:
        for name, read in _members(fileobj):
            key, ext = split_key(name)
            if current is not None and current.key != key:
                yield current
                current = None
            try:
                data = read()
            except (_TarError, OSError, ValueError):
                current = None  # this member's body is cut: its sample is incomplete
                raise
            if is_unsafe_name(name):
                on_bad(UNSAFE_MEMBER, f"{shard}: {name!r}")
                continue
            if ext not in KEEP_EXTS:
                continue  # never decode what the contract does not name (pickles, .pth, ...)
            if current is None:
                current = RawSample(key, shard)
            current.members[ext] = data
    except (_TarError, OSError, ValueError) as e:
        on_bad(TRUNCATED_TAR, f"{shard}: {e}")
        # Cut (or corrupt) inside a header: every member of the sample read so far was complete.
    if current is not None:
        yield current
