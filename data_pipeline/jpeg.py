"""The loader's fast JPEG path: read a JPEG's frame header without PIL, decode it straight into packed RGB.

Most training images are baseline or progressive 8-bit JPEGs already at the size the loader wants (the
shard writer resized them). For those the loader needs only the frame header (size, colour components) to
know that libjpeg-turbo can decode the bytes as they are, and PIL's ``Image.open`` — which parses every
segment in Python, quantisation tables included — cost about a quarter of a decode per image. ``jpeg_frame``
walks the segment lengths up to the frame header and reads four fields; anything it does not recognise
(another format, an arithmetic-coded or lossless or 12-bit frame, CMYK, a damaged segment list) returns
None and the caller takes PIL's general path, which decides and reports as before.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np
import torch
from torchvision.io import ImageReadMode

# Start-of-frame markers libjpeg-turbo's huffman decoder reads: baseline, extended sequential, progressive.
_HUFFMAN_FRAMES = frozenset((0xC0, 0xC1, 0xC2))
# Markers that stand alone (no length field): TEM, RST0-7; SOI is only valid first and handled there.
_STANDALONE = frozenset((0x01, *range(0xD0, 0xD8)))
_SOS, _EOI = 0xDA, 0xD9
_RGB = ImageReadMode.RGB.value


class JpegFrame(NamedTuple):
    width: int
    height: int
    components: int  # 1 = grey, 3 = colour (YCbCr or RGB; libjpeg converts either to RGB)
    progressive: bool


def jpeg_frame(data: bytes) -> JpegFrame | None:
    """The frame header of an 8-bit huffman-coded grey or 3-component JPEG; None for anything else
    (not a JPEG, another frame type, precision or component count, or a segment list that does not lead to
    a frame header before the scan data)."""
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    i = 2
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None  # segments must follow each other directly (no junk between markers)
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        if marker in _STANDALONE:
            i += 2
            continue
        if marker in (_SOS, _EOI):
            return None  # scan data or the end before any frame header
        length = (data[i + 2] << 8) | data[i + 3]
        if length < 2 or i + 2 + length > n:
            return None
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a start-of-frame (not DHT/JPG/DAC)
            if marker not in _HUFFMAN_FRAMES or length < 8:
                return None
            precision = data[i + 4]
            height = (data[i + 5] << 8) | data[i + 6]
            width = (data[i + 7] << 8) | data[i + 8]
            components = data[i + 9]
            if precision != 8 or components not in (1, 3) or length != 8 + 3 * components:
                return None
            if height < 1 or width < 1:  # height 0 = defined later by a DNL marker: PIL's path
                return None
            return JpegFrame(width, height, components, marker == 0xC2)
        i += 2 + length
    return None


def has_end_marker(data: bytes) -> bool:
    """The JPEG's last bytes (trailing zero padding aside) are the end-of-image marker FF D9: a file cut
    short has none, and libjpeg would fill its missing rows with grey where PIL refuses it."""
    if data.endswith(b"\xff\xd9"):
        return True
    return data[-1:] == b"\0" and data.rstrip(b"\0").endswith(b"\xff\xd9")


def decode_jpeg_hwc(data: bytes) -> np.ndarray:
    """A grey/colour JPEG → (h, w, 3) uint8 RGB through torchvision's libjpeg-turbo, straight into packed
    RGB: the same pixels as PIL's decode (same library and settings; tested), without PIL's 4-byte-per-pixel
    image and the packing copy ``np.asarray`` makes of it. Calls the registered operator directly (the
    public wrapper adds a deprecation warning and usage logging per call). A decode error is raised as
    OSError. The input is viewed, not copied: the caller's bytes are only read."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a view of immutable bytes: the decoder only reads it
        buf = torch.frombuffer(data, dtype=torch.uint8)
    try:
        chw = torch.ops.image.decode_jpeg(buf, _RGB, False)
    except RuntimeError as exc:
        raise OSError(str(exc)) from exc
    return chw.permute(1, 2, 0).numpy()  # libjpeg's (h, w, 3) memory, viewed back
