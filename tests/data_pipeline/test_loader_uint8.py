"""uint8 batches out of the loader, normalised on the model side (issue 18): the same tensors as the loader's
old float32 normalisation, bit for bit; the --gpu-decode path's CPU-side parts."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import jpeg_bytes, png_bytes, write_tar
from PIL import Image

import data_pipeline.loader as loader_module
from data_pipeline.loader import (
    UNDECODABLE_IMAGE,
    Collator,
    DecodedSample,
    ImageBatchBuilder,
    LoaderConfig,
    PretrainLoader,
    decode_sample,
    images_to_batch,
    pad_images,
    resolve_shards,
)
from data_pipeline.tarstream import RawSample
from soho.config import soho_tiny
from soho.encoder import GridEncoder, normalize_pixels

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def old_float_batch(images: list[np.ndarray], pad_multiple: int) -> torch.Tensor:
    """The loader's float32 pixel_values before issue 18, formula for formula."""
    std = torch.tensor(STD).view(3, 1, 1)
    scale, bias = 1.0 / (255.0 * std), -torch.tensor(MEAN).view(3, 1, 1) / std
    H = math.ceil(max(i.shape[0] for i in images) / pad_multiple) * pad_multiple
    W = math.ceil(max(i.shape[1] for i in images) / pad_multiple) * pad_multiple
    out = torch.empty(len(images), 3, H, W, dtype=torch.float32)
    for k, img in enumerate(images):
        h, w, _ = img.shape
        out[k, :, :h, :w].copy_(torch.from_numpy(img).permute(2, 0, 1)).mul_(scale).add_(bias)
        out[k, :, :h, w:] = 0
        out[k, :, h:, :] = 0
    return out


def _samples(sizes: list[tuple[int, int]], seed: int) -> list[DecodedSample]:
    rng = np.random.default_rng(seed)
    return [DecodedSample(f"k{i}", rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), f"caption {i}")
            for i, (h, w) in enumerate(sizes)]


@pytest.mark.parametrize(("sizes", "pad_multiple"), [
    ([(48, 48), (48, 48)], 32),                 # no padding at all
    ([(64, 32), (17, 64), (1, 1), (33, 5)], 32),  # ragged, a 1-pixel image, every pad direction
    ([(30, 41), (29, 7), (8, 8)], 8),
    ([(100, 3)], 16),
])
def test_uint8_batch_normalises_to_the_old_float_batch(sizes: list[tuple[int, int]], pad_multiple: int
                                                       ) -> None:
    samples = _samples(sizes, seed=len(sizes) * pad_multiple)
    batch = Collator(LoaderConfig(urls=[], pad_multiple=pad_multiple))(samples)
    pv, mask = batch["pixel_values"], batch["pixel_mask"]
    want = old_float_batch([s.image for s in samples], pad_multiple)
    assert pv.dtype == torch.uint8 and pv.shape == want.shape and mask.shape == (len(sizes), *want.shape[2:])
    for k, s in enumerate(samples):  # raw pixels in place, zeros and mask False outside
        h, w, _ = s.image.shape
        assert torch.equal(pv[k, :, :h, :w], torch.from_numpy(s.image).permute(2, 0, 1))
        assert int(pv[k].sum()) == int(s.image.astype(np.int64).sum())
        assert int(mask[k].sum()) == h * w and bool(mask[k, :h, :w].all())
    got = normalize_pixels(pv, mask)
    assert got.dtype == torch.float32 and got.is_contiguous()
    assert torch.equal(got, want)  # bit for bit, padding exactly 0 after normalisation
    assert torch.equal(normalize_pixels(pv, mask, dtype=torch.bfloat16), want.to(torch.bfloat16))
    # A contiguous uint8 copy (another caller's layout) gives the same values.
    assert torch.equal(normalize_pixels(pv.contiguous(), mask), want)


def test_incremental_batches_equal_padding_the_list() -> None:
    """ImageBatchBuilder (each image copied in as it is decoded) gives pad_images' tensors bit for bit, over
    batches that grow the buffer, shrink below the previous batch (compaction), end short, or have one
    image; dirty memory is never visible in the padding."""
    rng = np.random.default_rng(3)
    plans = [
        [(40, 40)] * 4,                       # square: the buffer fits exactly
        [(40, 20), (12, 40), (40, 40), (3, 3)],  # same padded size as the hint
        [(20, 40)] * 4,                       # all landscape after square: compacted
        [(20, 40), (72, 10), (5, 80), (1, 1)],  # grows twice (taller, then wider)
        [(33, 17), (9, 9)],                   # a short last batch
        [(64, 64)],
        [(8, 8), (8, 8), (8, 8), (8, 8)],
    ]
    for pad_multiple in (16, 8):
        builder = ImageBatchBuilder(4, pad_multiple)
        for sizes in plans:
            images = [rng.integers(1, 256, size=(h, w, 3), dtype=np.uint8) for h, w in sizes]
            for img in images:
                builder.add(img)
            assert len(builder) == len(images)
            pv, mask = builder.finish()
            want_pv, want_mask = pad_images([torch.from_numpy(i) for i in images], pad_multiple)
            assert pv.shape == want_pv.shape and mask.shape == want_mask.shape, sizes
            assert torch.equal(pv, want_pv) and torch.equal(mask, want_mask), sizes
            assert pv.permute(0, 2, 3, 1).is_contiguous()  # channels-last like pad_images
            assert len(builder) == 0
    with pytest.raises(ValueError, match="no image was added"):
        builder.finish()
    for _ in range(4):
        builder.add(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="already holds 4 images"):
        builder.add(np.zeros((8, 8, 3), np.uint8))


def test_real_loader_batches_normalise_like_before(synth_dir: Path) -> None:
    """Every batch of an epoch over 3 real shards: uint8 → normalised equals the old float path on the
    decoded images, and the grid encoder gives the same features for the uint8 batch as for the old float
    one."""
    shards = resolve_shards(str(synth_dir / "pretrain" / "manifest.json"))[:3]  # 36 samples
    cfg = LoaderConfig(urls=shards, batch_size=7, max_image_side=40, pad_multiple=16, shuffle_buffer=20,
                       seed=1, epochs=1)
    enc = GridEncoder(soho_tiny().encoder).eval()
    n = 0
    for b in PretrainLoader(cfg):
        images = [b["pixel_values"][k, :, m.any(1), :][:, :, m.any(0)].permute(1, 2, 0).numpy()
                  for k, m in enumerate(b["pixel_mask"])]
        want = old_float_batch(images, 16)
        assert torch.equal(normalize_pixels(b["pixel_values"], b["pixel_mask"]), want)
        if n == 0:
            with torch.no_grad():
                f8, m8, g8 = enc(b["pixel_values"], b["pixel_mask"])
                f32, m32, g32 = enc(want, b["pixel_mask"])
            assert torch.equal(f8, f32) and torch.equal(m8, m32) and g8 == g32
        n += len(b["keys"])
    assert n == 36


def test_bad_pixel_dtypes_are_refused_by_name() -> None:
    enc = GridEncoder(soho_tiny().encoder)
    with pytest.raises(ValueError, match="pixel_values must be uint8 .* got torch.int32"):
        enc(torch.zeros(1, 3, 32, 32, dtype=torch.int32))
    with pytest.raises(ValueError, match="normalize_pixels: pixel_values must be uint8"):
        normalize_pixels(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"pixel_mask must be \(B, H, W\)"):
        normalize_pixels(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), torch.ones(1, 8, 4, dtype=torch.bool))


def test_gpu_decode_batches_carry_jpeg_bytes_and_decode_like_the_cpu_path(synth_dir: Path) -> None:
    """--gpu-decode's loader side: the same samples, keys and tokens, JPEG bytes instead of pixels; the
    decoding half (images_to_batch) run on the CPU gives the CPU loader's pixels (no resize needed here)."""
    base = dict(urls=str(synth_dir / "pretrain" / "manifest.json"), batch_size=8, max_image_side=48,
                pad_multiple=32, shuffle_buffer=20, seed=2, epochs=1)
    cpu = list(PretrainLoader(LoaderConfig(**base)))
    raw = list(PretrainLoader(LoaderConfig(**base, gpu_decode=True)))
    assert [b["keys"] for b in raw] == [b["keys"] for b in cpu] and len(cpu) == 12
    worst = 0
    for r, c in zip(raw, cpu, strict=True):
        assert "pixel_values" not in r and torch.equal(r["input_ids"], c["input_ids"])
        assert all(t.dtype == torch.uint8 and t.dim() == 1 and bytes(t[:2].tolist()) == b"\xff\xd8"
                   for t in r["images"])
        pv, mask = images_to_batch(r["images"], 48, 32, "cpu")
        assert pv.dtype == torch.uint8 and torch.equal(mask, c["pixel_mask"])
        worst = max(worst, int((pv.int() - c["pixel_values"].int()).abs().max()))
    assert worst <= 2, f"torchvision's and PIL's libjpeg decodes differ by {worst} levels"


def test_gpu_decode_resizes_falls_back_and_counts_bad_headers(tmp_path: Path) -> None:
    big = jpeg_bytes(1, size=(96, 64))  # resized to 48x32 on the device side
    members = [("a.jpg", big), ("a.txt", b"big"), ("b.png", png_bytes("alpha", (20, 30))), ("b.txt", b"png"),
               ("c.jpg", b"\xff\xd8 not a jpeg"), ("c.txt", b"bad"),
               ("d.jpg", jpeg_bytes(2, mode="CMYK")), ("d.txt", b"cmyk")]
    write_tar(tmp_path / "s.tar", members)
    cfg = LoaderConfig(urls=str(tmp_path / "s.tar"), batch_size=8, max_image_side=48, pad_multiple=16,
                       shuffle_buffer=1, epochs=1, gpu_decode=True)
    loader = PretrainLoader(cfg)
    (b,) = list(loader)
    assert b["keys"] == ["a", "b", "d"] and loader.bad_sample_counts() == {UNDECODABLE_IMAGE: 1}
    a, png, cmyk = b["images"]
    assert a.dim() == 1 and bytes(a.numpy()) == big  # JPEG bytes travel as they are
    assert png.shape == (48, 32, 3) and cmyk.shape == (32, 48, 3)  # decoded (and resized) on the CPU instead
    pv, mask = images_to_batch(b["images"], 48, 16, "cpu")
    assert pv.shape == (3, 3, 48, 48)
    assert [int(m.sum()) for m in mask] == [32 * 48] * 3
    assert torch.equal(pv[1, :, :, :32], png.permute(2, 0, 1))
    assert torch.equal(pv[2, :, :32], cmyk.permute(2, 0, 1))
    assert int(pv[0, :, 32:, :].sum()) == 0  # a's padding (48 wide, 32 high after the resize)
    with pytest.raises(ValueError, match="decode_jpeg on cpu failed"):
        images_to_batch([torch.frombuffer(bytearray(b"\xff\xd8\xff\xe0 truncated"), dtype=torch.uint8)],
                        48, 16, "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_only_options_refuse_clearly_without_cuda(synth_dir: Path) -> None:
    from orchestration.pretrain.config import parse_run_config

    with pytest.raises(ValueError, match="pin_memory=True needs CUDA"):
        PretrainLoader(LoaderConfig(urls=str(synth_dir / "pretrain" / "manifest.json"), pin_memory=True))
    with pytest.raises(ValueError, match="--gpu-decode needs --use-gpu"):
        parse_run_config(["--gpu-decode"])
    assert parse_run_config(["--gpu-decode", "--use-gpu"]).dataset.gpu_decode is True


def test_batch_tokenizer_equals_the_transformers_call() -> None:
    """The loader's tokenization (one configured Rust backend) is exactly the transformers call's."""
    from data_pipeline.loader import BatchTokenizer
    from data_pipeline.tokenizer import load_tokenizer

    tok = load_tokenizer()
    texts = ["a dog on the left", "", "Ünïcödé café — naïve 東京 😀", "word " * 60, "x",
             "a red square above a blue circle, next to two small green triangles"]
    for max_len in (5, 40):
        fast = BatchTokenizer(tok, max_len)
        for batch in (texts, texts[:1], texts[3:4], texts[1:2]):
            want = tok(batch, padding="longest", truncation=True, max_length=max_len, return_tensors="pt")
            ids, mask = fast(batch)
            assert ids.dtype == mask.dtype == torch.int64
            assert torch.equal(ids, want["input_ids"]) and torch.equal(mask, want["attention_mask"])
    assert tok("word " * 60, truncation=True, max_length=40)["input_ids"][-1] == tok.sep_token_id


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (never ran on one when written)")
def test_cuda_paths_match_the_cpu_ones(synth_dir: Path) -> None:
    """Pinned batches hold the CPU loader's pixels; normalising on CUDA is bit for bit the CPU's; nvjpeg's
    decode of --gpu-decode batches is within a few levels of PIL's."""
    base = dict(urls=resolve_shards(str(synth_dir / "pretrain" / "manifest.json"))[:2], batch_size=8,
                max_image_side=48, pad_multiple=32, shuffle_buffer=20, seed=4, epochs=1)
    cpu = list(PretrainLoader(LoaderConfig(**base)))
    pinned = list(PretrainLoader(LoaderConfig(**base, pin_memory=True)))
    raw = list(PretrainLoader(LoaderConfig(**base, gpu_decode=True, pin_memory=True)))
    assert len(cpu) == len(pinned) == len(raw) == 3
    for c, p, r in zip(cpu, pinned, raw, strict=True):
        assert p["pixel_values"].is_pinned() and torch.equal(p["pixel_values"], c["pixel_values"])
        pv = p["pixel_values"].to("cuda", non_blocking=True)
        mask = p["pixel_mask"].to("cuda", non_blocking=True)
        want = normalize_pixels(c["pixel_values"], c["pixel_mask"])
        assert torch.equal(normalize_pixels(pv, mask).cpu(), want)
        assert torch.equal(normalize_pixels(pv, mask, torch.bfloat16).cpu(), want.to(torch.bfloat16))
        gpv, gmask = images_to_batch(r["images"], 48, 32, "cuda")
        assert gpv.is_cuda and gpv.dtype == torch.uint8 and torch.equal(gmask.cpu(), c["pixel_mask"])
        diff = (gpv.cpu().int() - c["pixel_values"].int()).abs().float()
        assert diff.mean() < 1.0 and diff.max() <= 32, (diff.mean(), diff.max())


@pytest.mark.parametrize("kind", ["q50-420", "q95-444", "q75-422-odd", "grey", "progressive", "cmyk"])
def test_direct_jpeg_decode_gives_pils_pixels(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A complete RGB/grey JPEG at its final size skips PIL's decode (libjpeg-turbo straight into packed
    RGB): the pixels must be PIL's, bit for bit; CMYK still goes through PIL; a file cut short is refused
    as before, not filled with grey."""
    direct = []
    monkeypatch.setattr(loader_module, "decode_jpeg_hwc",
                        lambda data, f=loader_module.decode_jpeg_hwc: direct.append(1) or f(data))
    rng = np.random.default_rng(len(kind))
    h, w = (37, 61) if kind.endswith("odd") else (64, 48)
    arr = np.cumsum(rng.integers(0, 40, size=(h, w, 3)), axis=1).astype(np.uint8)
    out = io.BytesIO()
    if kind == "grey":
        Image.fromarray(arr[..., 0]).save(out, "JPEG", quality=85)
    elif kind == "progressive":
        Image.fromarray(arr).save(out, "JPEG", quality=85, progressive=True)
    elif kind == "cmyk":
        Image.fromarray(arr).convert("CMYK").save(out, "JPEG", quality=85)
    else:
        q, sub = int(kind[1:3]), {"420": 2, "422": 1, "444": 0}[kind.split("-")[1]]
        Image.fromarray(arr).save(out, "JPEG", quality=q, subsampling=sub)
    data = out.getvalue()
    want = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    got = decode_sample(RawSample("k", "shard.tar", {"jpg": data, "txt": b"a caption"}), max(h, w))
    assert isinstance(got, DecodedSample) and got.caption == "a caption"
    assert got.image.shape == (h, w, 3) and got.image.dtype == np.uint8
    assert np.array_equal(got.image, want)
    assert len(direct) == (0 if kind == "cmyk" else 1)
    cut = RawSample("k", "shard.tar", {"jpg": data[: len(data) * 2 // 3], "txt": b"x"})
    assert decode_sample(cut, max(h, w)) == UNDECODABLE_IMAGE
    assert len(direct) == (0 if kind == "cmyk" else 1)  # never handed to libjpeg's grey fill
