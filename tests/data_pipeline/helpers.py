"""Builders for the data-pipeline tests: real image files of every kind, bad inputs, a loopback HTTP
server."""

from __future__ import annotations

import csv
import http.server
import io
import socket
import tarfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image


def jpeg_bytes(seed: int, size: tuple[int, int] = (48, 32), mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode == "CMYK":
        img = img.convert("CMYK")
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=90)
    return out.getvalue()


def png_bytes(kind: str, size: tuple[int, int] = (40, 30)) -> bytes:
    w, h = size
    if kind == "16bit":
        img = Image.fromarray(np.arange(w * h, dtype=np.uint16).reshape(h, w) * 50)  # mode I;16
    elif kind == "palette":
        img = Image.new("RGB", size, (200, 30, 30)).convert("P", palette=Image.Palette.ADAPTIVE)
    elif kind == "alpha":
        img = Image.new("RGBA", size, (10, 200, 10, 128))
    else:
        raise ValueError(kind)
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def bomb_png(side: int = 1200) -> bytes:
    out = io.BytesIO()
    Image.new("L", (side, side), 0).save(out, format="PNG", optimize=True)
    return out.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Handler(http.server.SimpleHTTPRequestHandler):
    slow_seconds = 3.0

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        if self.path.startswith("/slow/"):
            time.sleep(self.slow_seconds)
        elif self.path.startswith("/delay/"):  # a slow but working server: keeps a job running a while
            time.sleep(0.04)
            self.path = self.path[len("/delay") :]
        super().do_GET()

    def log_message(self, *args: object) -> None:
        pass

    def handle(self) -> None:
        try:
            super().handle()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout tests, killed jobs)


@contextmanager
def http_server(root: Path) -> Iterator[str]:
    """Serve ``root`` on 127.0.0.1; ``/slow/...`` answers only after a few seconds (timeout tests)."""

    def handler(*a: object, **k: object) -> _Handler:
        return _Handler(*a, directory=str(root), **k)

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


def write_csv(path: Path, rows: list[tuple[str, bytes | str]], delimiter: str = ",",
              extra: list[str] | None = None) -> None:
    """Rows of (image, caption); captions may be raw bytes (not UTF-8) so the file is written in binary."""
    buf = io.StringIO()
    w = csv.writer(buf, delimiter=delimiter, lineterminator="\n")
    w.writerow(["image", "caption", *(extra or [])])
    data = buf.getvalue().encode()
    for row in rows:
        parts = []
        for v in row:
            b = v if isinstance(v, bytes) else str(v).encode()
            if delimiter.encode() in b or b'"' in b:
                b = b'"' + b.replace(b'"', b'""') + b'"'
            parts.append(b)
        data += delimiter.encode().join(parts) + b"\n"
    path.write_bytes(data)


def read_shards(root: Path) -> dict[str, dict]:
    """All samples of the shards under ``root``: key → {jpg, txt, json}."""
    out: dict[str, dict] = {}
    for tar_path in sorted(root.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    """A tar of exactly these (member name, bytes), in this order (hand-made WebDataset shards)."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
