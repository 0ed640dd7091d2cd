"""Image validation, repair and normalisation for the shard writer.

``process_image`` turns raw bytes into the contract's RGB JPEG (longest side ≤ ``max_side``), or raises
``BadSample`` with a stable reason. Inputs that are odd but usable are repaired and reported by kind
(CMYK, 16-bit, palette, alpha and other modes → RGB) instead of being dropped.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

# Reasons written to bad_samples.jsonl (stable strings; tests and dashboards match on them).
EMPTY_FILE = "empty_file"
MISSING_FILE = "missing_file"
CORRUPT_IMAGE = "corrupt_image"
TRUNCATED_IMAGE = "truncated_image"
DECOMPRESSION_BOMB = "decompression_bomb"
CAPTION_NOT_UTF8 = "caption_not_utf8"
EMPTY_CAPTION = "empty_caption"
MISSING_CAPTION = "missing_caption"
CAPTION_NOT_STRING = "caption_not_string"  # a number, list, ... where a caption belongs
BAD_IMAGE_REFERENCE = "bad_image_reference"  # the image column holds no usable path/URL
UNEXPECTED_ERROR = "unexpected_error"  # any other failure on one input: detail has the type and message
DUPLICATE_SAMPLE = "duplicate_sample"
DUPLICATE_KEY = "duplicate_key"
URL_HTTP_ERROR = "url_http_{code}"
URL_TIMEOUT = "url_timeout"
URL_CONNECTION_REFUSED = "url_connection_refused"
URL_ERROR = "url_error"
UNSAFE_MEMBER_NAME = "unsafe_member_name"

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own default bomb threshold; configurable per job


class BadSample(Exception):
    """An input that must be rejected; ``reason`` is one of the constants above."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class ProcessedImage:
    jpeg: bytes
    width: int
    height: int
    original_width: int
    original_height: int
    repairs: list[str]


def _to_rgb(img: Image.Image, repairs: list[str]) -> Image.Image:
    """Convert any PIL mode to RGB, recording what was repaired."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "CMYK":
        repairs.append("cmyk_to_rgb")
        return img.convert("RGB")
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # convert("RGB") would clip 16-bit values at 255 (a white image); rescale to 8 bits instead.
        repairs.append("16bit_to_rgb")
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr8 = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB")
    if mode == "P":
        repairs.append("palette_to_rgb")
        if "transparency" in img.info:
            img = img.convert("RGBA")
            mode = "RGBA"
        else:
            return img.convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Composite on white: transparent pixels have arbitrary colour values underneath.
        repairs.append("alpha_to_rgb")
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    if mode in ("L", "1"):
        repairs.append("grayscale_to_rgb")
        return img.convert("RGB")
    repairs.append(f"mode_{mode}_to_rgb")
    return img.convert("RGB")


def fit_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """Size with the longest side ≤ max_side, keeping the aspect ratio (never upscales)."""
    longest = max(width, height)
    if longest <= max_side:
        return width, height
    scale = max_side / longest
    return max(1, round(width * scale)), max(1, round(height * scale))


def process_image(
    data: bytes, max_side: int, max_pixels: int = DEFAULT_MAX_PIXELS, quality: int = 90
) -> ProcessedImage:
    """Decode, validate, convert to RGB, resize (longest side ≤ max_side) and re-encode as JPEG."""
    if len(data) == 0:
        raise BadSample(EMPTY_FILE, "0 bytes")
    repairs: list[str] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w0, h0 = img.size
            if w0 * h0 > max_pixels:
                raise BadSample(DECOMPRESSION_BOMB, f"{w0}x{h0} pixels > limit {max_pixels}")
            if img.format == "JPEG" and max(w0, h0) >= 2 * max_side:
                # DCT-domain downscale while decoding (1/2, 1/4, 1/8): much cheaper than a full decode.
                # draft keeps both sides ≥ the requested ones, so ask for the final size, not a square.
                img.draft(img.mode, fit_size(w0, h0, max_side))
            img.load()
    except BadSample:
        raise
    except Image.DecompressionBombError as e:
        raise BadSample(DECOMPRESSION_BOMB, str(e)) from None
    except UnidentifiedImageError as e:
        raise BadSample(CORRUPT_IMAGE, str(e)) from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as e:
        reason = TRUNCATED_IMAGE if "truncated" in str(e).lower() else CORRUPT_IMAGE
        raise BadSample(reason, f"{type(e).__name__}: {e}") from None
    try:
        img = _to_rgb(img, repairs)
        size = fit_size(img.width, img.height, max_side)
        if size != img.size:
            # Bilinear with PIL's antialiasing support (scaled with the ratio): area-like downscale quality
            # at about half the cost of bicubic.
            img = img.resize(size, Image.Resampling.BILINEAR)
        out = io.BytesIO()
        img.save(out, format="JPEG", quality=quality)
    except (OSError, ValueError) as e:
        raise BadSample(CORRUPT_IMAGE, f"{type(e).__name__}: {e}") from None
    return ProcessedImage(out.getvalue(), img.width, img.height, w0, h0, repairs)


def encode_jpeg(img: Image.Image, quality: int = 90) -> bytes:
    out = io.BytesIO()
    img.convert("RGB").save(out, format="JPEG", quality=quality)
    return out.getvalue()


def process_caption(raw: object, max_chars: int) -> tuple[str, list[str]]:
    """Validate a caption (UTF-8, not blank) and truncate overlong ones at a word boundary."""
    if raw is None:
        raise BadSample(MISSING_CAPTION, "no caption")
    if not isinstance(raw, (str, bytes)):
        raise BadSample(CAPTION_NOT_STRING,
                        f"caption is a {type(raw).__name__} ({str(raw)[:80]!r}), not text")
    if isinstance(raw, str):
        # Tabular readers decode with surrogateescape: undecodable bytes survive as lone surrogates.
        raw = raw.encode("utf-8", "surrogateescape")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadSample(CAPTION_NOT_UTF8, str(e)) from None
    text = " ".join(text.split())
    if not text:
        raise BadSample(EMPTY_CAPTION, "empty or whitespace-only caption")
    repairs: list[str] = []
    if len(text) > max_chars:
        cut = text[:max_chars]
        space = cut.rfind(" ")
        text = cut[:space] if space > max_chars // 2 else cut
        repairs.append("caption_truncated")
    return text, repairs
