"""Safe, streaming reading of WebDataset tars (ours and img2dataset's).

Members are grouped into samples by key (the member path up to the first dot of its file name), read
sequentially (no seeking, so it works on s3 streams), never extracted to disk, and only the extensions we
decode are kept: images, ``txt``, ``json``. Pickles and other members are ignored, never loaded. Member
names that are absolute or contain ``..`` are rejected: nothing from outside may be trusted as a path.
"""

from __future__ import annotations

import logging
import tarfile
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


def iter_tar(fileobj: IO[bytes], shard: str, on_bad: Callable[[str, str], None]) -> Iterator[RawSample]:
    """Yield samples of one tar stream; problems are reported via ``on_bad(reason, detail)``, never raised.

    A truncated tar yields every complete sample before the damage; the partial one is dropped.
    """
    current: RawSample | None = None
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                if is_unsafe_name(member.name):
                    on_bad(UNSAFE_MEMBER, f"{shard}: {member.name!r}")
                    continue
                key, ext = split_key(member.name)
                if ext not in KEEP_EXTS:
                    continue  # never decode what the contract does not name (pickles, .pth, ...)
                if current is not None and current.key != key:
                    yield current  # complete: a new key starts (before reading data that may be cut)
                    current = None
                f = tar.extractfile(member)
                data = f.read() if f is not None else b""
                if len(data) != member.size:
                    raise tarfile.ReadError(f"member {member.name} is short ({len(data)} of {member.size} bytes)")
                if current is None:
                    current = RawSample(key, shard)
                current.members[ext] = data
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        on_bad(TRUNCATED_TAR, f"{shard}: {type(e).__name__}: {e}")
        return
    if current is not None:
        yield current
