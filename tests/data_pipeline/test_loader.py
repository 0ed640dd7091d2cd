"""The training stream: batch layout, exactly-once epochs across ranks×workers, exact resume, bad shards."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import jpeg_bytes, write_tar
from PIL import Image

from data_pipeline.loader import LoaderConfig, PretrainLoader, resolve_shards
from data_pipeline.tokenizer import load_tokenizer


def _cfg(synth_dir: Path, **kw) -> LoaderConfig:
    base = dict(urls=str(synth_dir / "pretrain" / "manifest.json"), batch_size=5, max_image_side=48,
                pad_multiple=32, shuffle_buffer=20, seed=7, epochs=1)
    base.update(kw)
    return LoaderConfig(**base)


def _keys(batches: list[dict]) -> list[str]:
    return [k for b in batches for k in b["keys"]]


def test_batch_layout(synth_dir: Path) -> None:
    tok = load_tokenizer()
    b = next(iter(PretrainLoader(_cfg(synth_dir, batch_size=4))))
    assert b["pixel_values"].shape == (4, 3, 64, 64) and b["pixel_values"].dtype == torch.uint8
    assert b["pixel_mask"].shape == (4, 64, 64) and b["pixel_mask"].dtype == torch.bool
    assert b["pixel_mask"][:, :48, :48].all() and not b["pixel_mask"][:, 48:, :].any()
    assert (b["pixel_values"][:, :, 48:, :] == 0).all() and (b["pixel_values"][:, :, :, 48:] == 0).all()
    # Raw RGB 0..255 (the model normalises, tests/data_pipeline/test_loader_uint8.py); real pixels not blank.
    assert b["pixel_values"][:, :, :48, :48].float().std() > 10
    assert b["input_ids"].dtype == torch.int64 and b["attention_mask"].dtype == torch.int64
    assert (b["input_ids"][:, 0] == tok.cls_token_id).all()
    for row, mask in zip(b["input_ids"], b["attention_mask"], strict=True):
        n = int(mask.sum())
        assert row[n - 1] == tok.sep_token_id and (row[n:] == tok.pad_token_id).all()
    assert len(b["keys"]) == 4 and all(k.startswith("p") for k in b["keys"])


def test_variable_sizes_padding_and_img2dataset_layout(tmp_path: Path) -> None:
    """img2dataset output (00000.tar with .jpg/.txt/.json) loads as is; sizes differ per sample."""
    sizes = [(64, 32), (32, 64), (48, 48), (20, 60)]
    members = []
    for i, s in enumerate(sizes):
        key = f"{i:09d}"
        members += [(f"{key}.jpg", jpeg_bytes(i, s)), (f"{key}.txt", f"caption {i}".encode()),
                    (f"{key}.json", json.dumps({"url": "http://x", "key": key}).encode())]
    write_tar(tmp_path / "00000.tar", members)
    loader = PretrainLoader(LoaderConfig(urls=str(tmp_path / "00000.tar"), batch_size=4, max_image_side=64,
                                         pad_multiple=32, shuffle_buffer=0, epochs=1))
    (b,) = list(loader)
    assert b["keys"] == [f"{i:09d}" for i in range(4)]
    assert b["pixel_values"].shape == (4, 3, 64, 64)
    expect = [(32, 64), (64, 32), (64, 64), (64, 21)]  # (h, w) after fitting the longest side to 64
    for i, (h, w) in enumerate(expect):
        assert int(b["pixel_mask"][i].sum()) == h * w
        assert b["pixel_mask"][i, :h, :w].all()
    tok = load_tokenizer()
    assert tok.decode(b["input_ids"][2], skip_special_tokens=True) == "caption 2"


def test_ranks_and_workers_see_each_sample_once_per_epoch(synth_dir: Path) -> None:
    """2 simulated ranks × 2 DataLoader workers, non-resampled: every sample exactly once per epoch."""
    all_keys = {json.loads(m)["key"] for m in _all_json(synth_dir)}
    assert len(all_keys) == 96
    per_epoch: list[list[str]] = [[], []]
    per_rank: list[set[str]] = [set(), set()]
    for rank in range(2):
        loader = PretrainLoader(_cfg(synth_dir, num_workers=2, epochs=2), rank=rank, world_size=2)
        for b in loader:
            per_epoch[loader.epoch] += b["keys"]  # epoch increments only after its last batch
            per_rank[rank] |= set(b["keys"])
        assert loader.epoch == 2
    for e in range(2):
        assert len(per_epoch[e]) == 96 and set(per_epoch[e]) == all_keys
    assert per_epoch[0] != per_epoch[1]  # shards and windows reshuffle every epoch
    assert per_rank[0] and per_rank[1]


def _all_json(synth_dir: Path) -> list[bytes]:
    out = []
    for p in sorted((synth_dir / "pretrain").glob("*.tar")):
        with tarfile.open(p) as tar:
            out += [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".json")]
    return out


@pytest.mark.parametrize("num_workers,resampled", [(0, False), (2, False), (0, True), (2, True)])
def test_state_round_trip_resumes_exactly(synth_dir: Path, num_workers: int, resampled: bool) -> None:
    cfg = _cfg(synth_dir, num_workers=num_workers, resampled=resampled, epochs=2 if not resampled else None)
    total = 30  # crosses an epoch boundary (non-resampled: 96 samples / 5 per batch ≈ 20 per epoch)
    ref = PretrainLoader(cfg)
    expected = [b for _, b in zip(range(total), ref, strict=False)]
    stop = 13
    first = PretrainLoader(cfg)
    got = [b for _, b in zip(range(stop), first, strict=False)]
    state = json.loads(json.dumps(first.state_dict()))  # JSON-able
    resumed = PretrainLoader(cfg)
    resumed.load_state_dict(state)
    got += [b for _, b in zip(range(total - stop), resumed, strict=False)]
    assert _keys(got) == _keys(expected)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a["pixel_values"], b["pixel_values"])
        assert torch.equal(a["input_ids"], b["input_ids"])
    if not resampled:
        assert resumed.epoch == ref.epoch == 1


def test_resume_checks_layout(synth_dir: Path) -> None:
    state = PretrainLoader(_cfg(synth_dir)).state_dict()
    with pytest.raises(ValueError, match="world_size"):
        PretrainLoader(_cfg(synth_dir), rank=0, world_size=2).load_state_dict(state)


def test_too_few_shards_is_a_clear_error(synth_dir: Path) -> None:
    shards = resolve_shards(str(synth_dir / "pretrain" / "manifest.json"))
    assert len(shards) == 8
    with pytest.raises(ValueError, match=r"8 shard\(s\) < world_size 3 × workers 3 = 9"):
        PretrainLoader(_cfg(synth_dir, num_workers=3), rank=0, world_size=3)


def test_brace_pattern_and_list(synth_dir: Path) -> None:
    pattern = str(synth_dir / "pretrain" / "shards-{000000..000007}.tar")
    a = _keys(list(PretrainLoader(_cfg(synth_dir, urls=pattern))))
    b = _keys(list(PretrainLoader(_cfg(synth_dir, urls=resolve_shards(pattern)))))
    assert a == b and len(set(a)) == 96


def test_bad_shard_content_is_skipped_and_counted(tmp_path: Path) -> None:
    good = [(f"g{i}.jpg", jpeg_bytes(i)) for i in range(6)]
    members = []
    for i, (name, data) in enumerate(good[:3]):
        members += [(name, data), (f"g{i}.txt", b"good")]
    members += [("../evil.jpg", jpeg_bytes(50)), ("../evil.txt", b"x"), ("/abs.jpg", jpeg_bytes(51)),
                ("bad.jpg", b"not an image at all"), ("bad.txt", b"undecodable"),
                ("pick.pickle", b"\x80\x04K\x01."), ("pick.txt", b"no image")]
    write_tar(tmp_path / "a.tar", members)
    # b.tar: three good samples, then cut in the middle of the 4th member group.
    members_b = []
    for i, (_, data) in enumerate(good[3:]):
        members_b += [(f"h{i}.jpg", data), (f"h{i}.txt", b"good")]
    members_b += [("h9.jpg", jpeg_bytes(99, (200, 200)))]
    write_tar(tmp_path / "b.tar", members_b)
    raw = (tmp_path / "b.tar").read_bytes()
    (tmp_path / "b.tar").write_bytes(raw[: len(raw) - 1024 - 3000])
    loader = PretrainLoader(LoaderConfig(urls=[str(tmp_path / "a.tar"), str(tmp_path / "b.tar")],
                                         batch_size=4, max_image_side=32, shuffle_buffer=0, epochs=1))
    keys = _keys(list(loader))
    assert sorted(keys) == ["g0", "g1", "g2", "h0", "h1", "h2"]
    counts = loader.bad_sample_counts()
    assert counts == {"unsafe_member_name": 3, "undecodable_image": 1, "missing_image": 1, "truncated_tar": 1}


def test_no_horizontal_flip(tmp_path: Path) -> None:
    """Left stays left: captions name left and right, so the loader must not mirror images."""
    arr = np.zeros((32, 32, 3), dtype=np.uint8)
    arr[:, :16] = (255, 0, 0)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    write_tar(tmp_path / "s.tar",
         [(f"k{i}.png", buf.getvalue()) for i in range(1)] + [("k0.txt", b"red on the left")])
    for seed in range(5):
        (b,) = list(PretrainLoader(LoaderConfig(urls=str(tmp_path / "s.tar"), batch_size=1, max_image_side=32,
                                                seed=seed, epochs=1)))
        red = b["pixel_values"][0, 0].float()
        assert red[:, :8].mean() > 250 and red[:, 24:].mean() < 5
