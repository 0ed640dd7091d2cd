"""The fast JPEG header reader agrees with PIL on what it accepts, and hands everything else to PIL."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from data_pipeline.jpeg import JpegFrame, decode_jpeg_hwc, has_end_marker, jpeg_frame


def _jpeg(kind: str, h: int = 40, w: int = 56, **save: object) -> bytes:
    rng = np.random.default_rng(len(kind) + h + w)
    arr = np.cumsum(rng.integers(0, 30, size=(h, w, 3)), axis=1).astype(np.uint8)
    img = Image.fromarray(arr)
    if kind == "grey":
        img = img.convert("L")
    elif kind == "cmyk":
        img = img.convert("CMYK")
    out = io.BytesIO()
    img.save(out, "JPEG", **save)
    return out.getvalue()


CASES = {
    "baseline": _jpeg("rgb", quality=80),
    "progressive": _jpeg("rgb", progressive=True),
    "grey": _jpeg("grey"),
    "odd-size-444": _jpeg("rgb", h=37, w=61, subsampling=0),
    "exif+icc": _jpeg("rgb", exif=Image.Exif().tobytes() + b"\0" * 64, icc_profile=b"\0" * 3000),
    "restart-markers": _jpeg("rgb", h=64, w=64, restart_marker_blocks=1),
    "optimized": _jpeg("rgb", optimize=True),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_frame_is_pils_size_and_mode(name: str) -> None:
    data = CASES[name]
    pil = Image.open(io.BytesIO(data))
    frame = jpeg_frame(data)
    assert frame == JpegFrame(pil.width, pil.height, {"L": 1, "RGB": 3}[pil.mode], name == "progressive")
    assert has_end_marker(data) and has_end_marker(data + b"\0" * 5)
    assert np.array_equal(decode_jpeg_hwc(data), np.asarray(pil.convert("RGB")))


def test_everything_else_is_left_to_pil() -> None:
    base = CASES["baseline"]
    sof = base.index(b"\xff\xc0")
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, "PNG")
    others = {
        "cmyk": _jpeg("cmyk"),
        "png": png.getvalue(),
        "empty": b"",
        "soi only": b"\xff\xd8",
        "text": b"not an image at all",
        "arithmetic frame (SOF9)": base[:sof + 1] + b"\xc9" + base[sof + 2:],
        "lossless frame (SOF3)": base[:sof + 1] + b"\xc3" + base[sof + 2:],
        "12-bit precision": base[:sof + 4] + b"\x0c" + base[sof + 5:],
        "height 0 (DNL)": base[:sof + 5] + b"\0\0" + base[sof + 7:],
        "junk between segments": base[:2] + b"\x00" + base[2:],
        "segment length past the end": base[:4] + b"\xff\xff" + base[6:],
        "scan before the frame": b"\xff\xd8\xff\xda\x00\x08" + b"\0" * 64,
    }
    for name, data in others.items():
        assert jpeg_frame(data) is None, name
    end = sof + 2 + 8 + 3 * 3  # the colour frame header's segment: marker, length, 6 bytes, 3 per component
    for cut in range(end):  # every prefix that stops inside or before the frame header
        assert jpeg_frame(base[:cut]) is None, cut
    assert jpeg_frame(base[:end]) == jpeg_frame(base)  # the header is all it reads


def test_fill_bytes_and_standalone_markers_are_skipped() -> None:
    base = CASES["grey"]
    padded = base[:2] + b"\xff\xff\xff\xd0" + base[2:]  # fill bytes, then an RST marker (no length field)
    assert jpeg_frame(padded) == jpeg_frame(base) == JpegFrame(56, 40, 1, False)


def test_random_damage_never_raises() -> None:
    """Bytes flipped anywhere in the header region: the reader answers None or a frame, never an error,
    and a frame it returns is the one its bytes say (PIL agrees whenever PIL can read the header)."""
    base = CASES["exif+icc"]
    sos = base.index(b"\xff\xda")
    rng = np.random.default_rng(0)
    agreed = 0
    for _ in range(400):
        data = bytearray(base)
        for pos in rng.integers(0, sos, size=int(rng.integers(1, 4))):
            data[pos] = int(rng.integers(0, 256))
        frame = jpeg_frame(bytes(data))
        if frame is None:
            continue
        try:
            pil = Image.open(io.BytesIO(bytes(data)))
        except Exception:  # noqa: BLE001 - PIL refusing a damaged header is fine; the reader must not raise
            continue
        assert (frame.width, frame.height) == pil.size
        agreed += 1
    assert agreed > 100  # most flips land in the EXIF/ICC payload, which neither reader interprets


def test_end_marker() -> None:
    data = CASES["baseline"]
    assert not has_end_marker(data[:-1]) and not has_end_marker(data[: len(data) // 2] + b"\0\0")
    assert not has_end_marker(b"") and not has_end_marker(b"\0")
