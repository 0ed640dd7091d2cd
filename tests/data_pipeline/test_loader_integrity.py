"""Loader verification: shards changed in place after sharding are not trained on; unreadable data raises
fast."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
import tarfile
import time
from pathlib import Path

import pytest
from helpers import jpeg_bytes

from data_pipeline.loader import DataUnreadableError, LoaderConfig, PretrainLoader


def _copy(synth_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the synthetic pre-training shards (8 shards × 12 pairs) that a test may damage."""
    out = tmp_path / "pretrain"
    shutil.copytree(synth_dir / "pretrain", out)
    return out


def _cfg(urls: str | list[str], **kw) -> LoaderConfig:
    base = dict(urls=urls, batch_size=5, max_image_side=48, pad_multiple=32, shuffle_buffer=20, seed=7,
                epochs=2)
    base.update(kw)
    return LoaderConfig(**base)


def _keys_of(shard: Path) -> list[str]:
    with tarfile.open(shard) as tar:
        return sorted({m.name.split(".", 1)[0] for m in tar.getmembers()})


def _alter_in_place(shard: Path, ext: str, which: int = 0) -> str:
    """Change bytes inside the data of the ``which``-th ``.ext`` member, keeping the file's size; its key."""
    with tarfile.open(shard) as tar:
        m = [m for m in tar.getmembers() if m.name.endswith("." + ext)][which]
    data = bytearray(shard.read_bytes())
    size = len(data)
    if ext == "txt":  # a caption of the same length that says something else
        data[m.offset_data : m.offset_data + m.size] = b"x" * m.size
    else:  # flip a few bytes in the middle of the JPEG's entropy-coded data
        mid = m.offset_data + m.size // 2
        data[mid : mid + 4] = bytes(b ^ 0x5A for b in data[mid : mid + 4])
    shard.write_bytes(bytes(data))
    assert shard.stat().st_size == size
    return m.name.split(".", 1)[0]


def _epochs(loader: PretrainLoader) -> list[list[str]]:
    out: list[list[str]] = [[] for _ in range(loader.cfg.epochs)]
    for b in loader:
        out[loader.epoch] += b["keys"]
    return out


@pytest.mark.parametrize("num_workers", [0, 2])
def test_shards_changed_in_place_are_rejected_and_skipped_later(
    synth_dir: Path, tmp_path: Path, num_workers: int, caplog: pytest.LogCaptureFixture
) -> None:
    root = _copy(synth_dir, tmp_path)
    shards = sorted(root.glob("*.tar"))
    all_keys = {k for s in shards for k in _keys_of(s)}
    jpg_key = _alter_in_place(shards[2], "jpg", 3)
    txt_key = _alter_in_place(shards[5], "txt", 1)
    lost = set(_keys_of(shards[2])) | set(_keys_of(shards[5]))
    caplog.set_level(logging.WARNING, logger="data_pipeline.loader")
    loader = PretrainLoader(_cfg(str(root / "manifest.json"), num_workers=num_workers))
    per_epoch = _epochs(loader)
    for keys in per_epoch:  # a rejected shard gives nothing, in the pass that finds it and in later ones
        assert len(keys) == len(set(keys)) == 96 - 24 and set(keys) == all_keys - lost
    assert jpg_key in lost and txt_key in lost
    # Counted once: the second epoch skips both shards without reading them (else these would be 2 each).
    assert loader.bad_sample_counts() == {"sample_hash_mismatch": 2, "shard_hash_mismatch": 2}
    rejected = loader.rejected_shards()
    assert sorted(rejected) == sorted(str(s) for s in (shards[2], shards[5]))
    assert all(v.startswith("shard_hash_mismatch") for v in rejected.values())
    assert loader.state_dict()["rejected_shards"] == rejected
    # What the training worker exports: soho_data_bad_samples_total{reason=...}
    from orchestration.runtime.metrics import SohoMetrics

    metrics = SohoMetrics(rank=0)
    metrics.set_bad_samples(loader.bad_sample_counts())
    for reason in ("sample_hash_mismatch", "shard_hash_mismatch"):
        assert metrics.registry.get_sample_value(
            "soho_data_bad_samples_total", {"rank": "0", "reason": reason}) == 2
    if num_workers == 0:  # logs of DataLoader worker processes do not reach caplog
        text = caplog.text
        assert f"shard {shards[2]}: skipping bad content (sample_hash_mismatch): sample '{jpg_key}'" in text
        assert f"shard {shards[5]}: shard_hash_mismatch" in text


def test_resume_with_rejected_shards_is_exact(synth_dir: Path, tmp_path: Path) -> None:
    root = _copy(synth_dir, tmp_path)
    shards = sorted(root.glob("*.tar"))
    _alter_in_place(shards[1], "jpg", 0)
    _alter_in_place(shards[6], "txt", 0)
    cfg = _cfg(str(root / "manifest.json"))
    expected = [k for b in PretrainLoader(cfg) for k in b["keys"]]
    assert len(expected) == 2 * 72
    for stop in (3, 17):  # inside epoch 0 (rejections partly known), inside epoch 1 (all known)
        first = PretrainLoader(cfg)
        got = [k for _, b in zip(range(stop), first, strict=False) for k in b["keys"]]
        resumed = PretrainLoader(cfg)
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        got += [k for b in resumed for k in b["keys"]]
        assert got == expected
        assert resumed.bad_sample_counts() == {"sample_hash_mismatch": 2, "shard_hash_mismatch": 2}


def test_without_a_manifest_only_the_altered_samples_are_dropped(synth_dir: Path, tmp_path: Path) -> None:
    """Brace pattern: no shard hashes to check, but each sample's json still carries the writer's hashes."""
    root = _copy(synth_dir, tmp_path)
    shards = sorted(root.glob("*.tar"))
    altered = {_alter_in_place(shards[0], "jpg", 5), _alter_in_place(shards[4], "txt", 2)}
    all_keys = {k for s in shards for k in _keys_of(s)}
    loader = PretrainLoader(_cfg(str(root / "shards-{000000..000007}.tar")))
    for keys in _epochs(loader):
        assert len(keys) == len(set(keys)) == 94 and set(keys) == all_keys - altered
    assert loader.bad_sample_counts() == {"sample_hash_mismatch": 4}  # 2 samples × 2 epochs
    assert loader.rejected_shards() == {}


def test_verify_off_trains_on_what_is_there(synth_dir: Path, tmp_path: Path) -> None:
    root = _copy(synth_dir, tmp_path)
    shards = sorted(root.glob("*.tar"))
    _alter_in_place(shards[3], "txt", 0)
    with shards[7].open("ab") as f:  # grown: a size mismatch, but the tar itself still reads
        f.write(b"\0" * 1024)
    loader = PretrainLoader(_cfg(str(root / "manifest.json"), verify=False, epochs=1))
    (keys,) = _epochs(loader)
    assert len(set(keys)) == 96 and loader.bad_sample_counts() == {}
    checked = PretrainLoader(_cfg(str(root / "manifest.json"), epochs=1))
    (keys,) = _epochs(checked)
    assert len(set(keys)) == 96 - 24
    assert checked.bad_sample_counts() == {"sample_hash_mismatch": 1, "shard_hash_mismatch": 1,
                                           "shard_size_mismatch": 1}
    assert checked.rejected_shards()[str(shards[7])] == (
        f"shard_size_mismatch ({shards[7].stat().st_size} bytes, "
        f"the manifest says {shards[7].stat().st_size - 1024})")


def _tar(path: Path, members: list[tuple[str, bytes]]) -> bytes:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path.read_bytes()


def test_old_shards_and_img2dataset_hashes(tmp_path: Path) -> None:
    """Shards written before txt_sha256 load (jpg checked); img2dataset's sha256 (of the download) is
    ignored."""
    old = tmp_path / "old"
    old.mkdir()
    entries = []
    for s in range(2):
        members = []
        for i in range(3):
            key, jpg = f"s{s}k{i}", jpeg_bytes(10 * s + i)
            meta = {"key": key, "sha256": hashlib.sha256(jpg).hexdigest(), "width": 48, "height": 32}
            members += [(f"{key}.jpg", jpg), (f"{key}.txt", f"caption {key}".encode()),
                        (f"{key}.json", json.dumps(meta).encode())]
        data = _tar(old / f"shards-{s:06d}.tar", members)
        entries.append({"name": f"shards-{s:06d}.tar", "samples": 3, "bytes": len(data),
                        "sha256": hashlib.sha256(data).hexdigest()})
    (old / "manifest.json").write_text(json.dumps({"format": "soho-webdataset", "format_version": 1,
                                                   "shards": entries}))
    loader = PretrainLoader(_cfg(str(old / "manifest.json"), epochs=1, batch_size=2))
    assert sorted(k for b in loader for k in b["keys"]) == [f"s{s}k{i}" for s in range(2) for i in range(3)]
    assert loader.bad_sample_counts() == {}

    i2d = tmp_path / "00000.tar"
    members = []
    for i in range(4):  # img2dataset records the sha256 of the original download, not of the resized jpg
        key = f"{i:09d}"
        meta = {"key": key, "url": "http://x", "status": "success",
                "sha256": hashlib.sha256(b"orig").hexdigest()}
        members += [(f"{key}.jpg", jpeg_bytes(i)), (f"{key}.txt", b"a caption"),
                    (f"{key}.json", json.dumps(meta).encode())]
    _tar(i2d, members)
    loader = PretrainLoader(_cfg(str(i2d), epochs=1, batch_size=4))
    assert [k for b in loader for k in b["keys"]] != [] and loader.bad_sample_counts() == {}


@pytest.mark.parametrize("num_workers,resampled", [(0, False), (2, False), (0, True), (2, True)])
def test_no_readable_shard_raises_within_seconds(
    synth_dir: Path, tmp_path: Path, num_workers: int, resampled: bool
) -> None:
    """Before: an endless loop of empty epochs at full CPU. Now: an error naming the shards and causes."""
    root = _copy(synth_dir, tmp_path)
    shards = sorted(root.glob("*.tar"))
    for s in shards[:6]:
        s.unlink()  # missing objects
    for s in shards[6:]:
        s.write_bytes(b"this is not a tar file" * 40)  # garbage of another size
    # Resampled: 4 draws in a row that give nothing; epochs: the whole pass (8 shards < 10 in a row).
    cfg = _cfg(str(root / "manifest.json"), num_workers=num_workers, resampled=resampled,
               epochs=None, max_bad_shards_in_row=4 if resampled else 10)
    t = time.perf_counter()
    with pytest.raises(DataUnreadableError) as info:
        next(iter(PretrainLoader(cfg)))
    elapsed = time.perf_counter() - t
    assert elapsed < 15.0, elapsed  # measured 0.01-0.1 s (workers 0 and 2) on a busy 2-core machine
    msg = str(info.value)
    named = [s for s in shards if f"{s}:" in msg]
    if resampled:  # draws with replacement: 4 draws name 1-4 distinct shards
        assert "4 shards in a row gave no usable sample" in msg and 1 <= len(named) <= 4
    else:
        assert "epoch 0 of rank 0 gave no batch from 8 shard(s)" in msg and len(named) == 8
    for s in named:
        assert (f"{s}: unreadable_shard (FileNotFoundError" in msg) or (f"{s}: shard_size_mismatch" in msg)


def test_a_pass_without_a_batch_raises_instead_of_looping(tmp_path: Path) -> None:
    """Readable tars whose images all fail to decode: before, epochs=None looped over empty epochs forever."""
    urls = []
    for s in range(3):
        _tar(tmp_path / f"{s}.tar", [m for i in range(2) for m in ((f"k{s}{i}.jpg", b"not a jpeg"),
                                                                  (f"k{s}{i}.txt", b"caption"))])
        urls.append(str(tmp_path / f"{s}.tar"))
    t = time.perf_counter()
    with pytest.raises(DataUnreadableError, match=r"epoch 0 of rank 0 gave no batch from 3 shard\(s\) of "
                                                  r"the configured list; .*\{'undecodable_image': 6\}"):
        next(iter(PretrainLoader(_cfg(urls, epochs=None))))
    assert time.perf_counter() - t < 15.0
    with pytest.raises(ValueError, match="max_bad_shards_in_row must be ≥ 1, got 0"):
        PretrainLoader(_cfg(urls, max_bad_shards_in_row=0))
