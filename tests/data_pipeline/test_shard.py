"""``python -m data_pipeline shard``: every source format round-trips, bad input is reported, not fatal."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import bomb_png, free_port, http_server, jpeg_bytes, png_bytes, read_shards, write_csv
from PIL import Image

from data_pipeline.shard import ShardJobConfig, merge_manifests, run_shard_job
from data_pipeline.sources import SourceError

REPO = Path(__file__).resolve().parents[2]
SIZES = [(40, 30), (24, 56), (33, 33), (70, 20), (16, 48)]


def _images(d: Path) -> list[tuple[str, str, tuple[int, int]]]:
    """Five distinct JPEGs under d/img; returns (relative path, caption, size)."""
    (d / "img").mkdir(parents=True, exist_ok=True)
    out = []
    for i, s in enumerate(SIZES):
        (d / "img" / f"i{i}.jpg").write_bytes(jpeg_bytes(i, s))
        out.append((f"img/i{i}.jpg", f"a caption, number {i} — ünïcode", s))
    return out


def _run(source: str, out: Path, **kw) -> dict:
    cfg = ShardJobConfig(source=source, output=str(out), samples_per_shard=2, workers=kw.pop("workers", 0),
                         max_image_side=kw.pop("max_image_side", 128), progress=False, **kw)
    run_shard_job(cfg)
    return json.loads((out / "manifest.json").read_text())


def _check_round_trip(out: Path, manifest: dict, expected: list[tuple[str, tuple[int, int]]]) -> None:
    samples = read_shards(out)
    assert manifest["totals"]["samples"] == len(samples) == len(expected)
    assert sum(s["samples"] for s in manifest["shards"]) == len(samples)
    for s in manifest["shards"]:
        data = (out / s["name"]).read_bytes()
        assert s["bytes"] == len(data) and s["sha256"] == hashlib.sha256(data).hexdigest()
    got = []
    for v in samples.values():
        meta = json.loads(v["json"])
        assert meta["sha256"] == hashlib.sha256(v["jpg"]).hexdigest()
        img = Image.open(io.BytesIO(v["jpg"]))
        assert img.format == "JPEG" and img.mode == "RGB" and img.size == (meta["width"], meta["height"])
        got.append((v["txt"].decode(), img.size))
    assert sorted(got) == sorted(expected)


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
def test_tabular_round_trip(tmp_path: Path, fmt: str) -> None:
    imgs = _images(tmp_path)
    rows = [(p, c) for p, c, _ in imgs]
    rows[1] = (str(tmp_path / rows[1][0]), rows[1][1])  # one absolute path, the rest relative to the table
    src = tmp_path / f"t.{fmt}"
    if fmt in ("csv", "tsv"):
        write_csv(src, rows, delimiter="," if fmt == "csv" else "\t")
    elif fmt == "jsonl":
        src.write_text("".join(json.dumps({"image": p, "caption": c}) + "\n" for p, c in rows))
    else:
        pq.write_table(pa.table({"image": [p for p, _ in rows], "caption": [c for _, c in rows]}), src)
    manifest = _run(str(src), tmp_path / "out", workers=2 if fmt == "csv" else 0)
    assert manifest["writer"]["source_format"] == fmt
    _check_round_trip(tmp_path / "out", manifest, [(c, s) for _, c, s in imgs])


def test_coco_round_trip(tmp_path: Path) -> None:
    imgs = _images(tmp_path / "root")
    coco = {"images": [{"id": 10 + i, "file_name": p} for i, (p, _, _) in enumerate(imgs)],
            "annotations": [{"id": 100 + i, "image_id": 10 + i, "caption": c}
                            for i, (_, c, _) in enumerate(imgs)]
            + [{"id": 200, "image_id": 10, "caption": "a second caption for the first image"}]}
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    manifest = _run(str(tmp_path / "captions.json"), tmp_path / "out", image_root=str(tmp_path / "root"))
    expected = [(c, s) for _, c, s in imgs] + [("a second caption for the first image", SIZES[0])]
    _check_round_trip(tmp_path / "out", manifest, expected)


def test_folder_round_trip_and_resize(tmp_path: Path) -> None:
    imgs = _images(tmp_path / "f")
    for p, c, _ in imgs:
        (tmp_path / "f" / p).with_suffix(".txt").write_text(c)
    manifest = _run(str(tmp_path / "f"), tmp_path / "out", max_image_side=32)
    assert manifest["writer"]["source_format"] == "folder"
    # Longest side ≤ 32 with the aspect ratio kept (never upscaled).
    expected = [(c, (round(w * min(1, 32 / max(w, h))), round(h * min(1, 32 / max(w, h)))))
                for _, c, (w, h) in imgs]
    _check_round_trip(tmp_path / "out", manifest, expected)


def test_webdataset_reshard_of_img2dataset_output(tmp_path: Path) -> None:
    imgs = _images(tmp_path)
    (tmp_path / "wds").mkdir()
    with tarfile.open(tmp_path / "wds" / "00000.tar", "w") as tar:
        for i, (p, c, _) in enumerate(imgs):
            for ext, data in (("jpg", (tmp_path / p).read_bytes()), ("txt", c.encode()),
                              ("json", json.dumps({"key": f"{i:09d}", "status": "success"}).encode())):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    manifest = _run(str(tmp_path / "wds"), tmp_path / "out")
    assert manifest["writer"]["source_format"] == "webdataset"
    _check_round_trip(tmp_path / "out", manifest, [(c, s) for _, c, s in imgs])
    assert {json.loads(v["json"])["source_key"] for v in read_shards(tmp_path / "out").values()} == {
        f"00000/{i:09d}" for i in range(5)}  # keys carry the tar's stem: unique across tars


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_pipeline", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300)


@pytest.mark.slow
def test_bad_inputs_are_reported_and_good_samples_kept(tmp_path: Path) -> None:
    d = tmp_path
    (d / "img").mkdir()
    rows: list[tuple[str, bytes | str, str]] = []
    good = []
    for i in range(8):
        (d / "img" / f"g{i}.jpg").write_bytes(jpeg_bytes(i, (30 + i, 20)))
        rows.append((f"img/g{i}.jpg", f"good {i}", f"k{i}"))
        good.append(f"good {i}")
    repaired = {"cmyk.jpg": jpeg_bytes(50, mode="CMYK"), "p16.png": png_bytes("16bit"),
                "pal.png": png_bytes("palette"), "alpha.png": png_bytes("alpha")}
    for name, data in repaired.items():
        (d / "img" / name).write_bytes(data)
        rows.append((f"img/{name}", f"repair {name}", f"r-{name}"))
    rows.append(("img/g0.jpg", "long " * 60, "long"))
    full = jpeg_bytes(77, (64, 64))
    bad_files = {"trunc.jpg": full[: len(full) // 2], "corrupt.jpg": bytes(range(256)) * 4, "zero.jpg": b"",
                 "bomb.png": bomb_png()}
    for name, data in bad_files.items():
        (d / "img" / name).write_bytes(data)
    expected_bad = {
        "trunc.jpg": "truncated_image", "corrupt.jpg": "corrupt_image", "zero.jpg": "empty_file",
        "bomb.png": "decompression_bomb", "missing.jpg": "missing_file",
    }
    for name in expected_bad:
        rows.append((f"img/{name}", f"bad {name}", f"b-{name}"))
    rows.append(("img/g1.jpg", b"not \xff\xfe utf-8", "b-utf8"))
    rows.append(("img/g2.jpg", " \t ", "b-blank"))
    rows.append(("img/g3.jpg", "good 3", "b-dup-sample"))  # identical image + caption
    rows.append(("img/g4.jpg", "other caption", "k4"))  # duplicate key
    with http_server(d / "img") as url:
        rows.append((f"{url}/nope.jpg", "bad 404", "b-404"))
        rows.append((f"{url}/slow/g5.jpg", "bad timeout", "b-timeout"))
        rows.append((f"http://127.0.0.1:{free_port()}/g5.jpg", "bad refused", "b-refused"))
        rows.append((f"{url}/g6.jpg", "fetched over http", "k-http"))
        write_csv(d / "t.csv", [(p, c) for p, c, _ in rows], extra=["key"])
        # Append the key column to every row (write_csv writes image, caption only).
        lines = (d / "t.csv").read_bytes().split(b"\n")
        keyed = [line + b"," + k.encode() for line, (_, _, k) in zip(lines[1:], rows, strict=False)]
        (d / "t.csv").write_bytes(b"\n".join([lines[0]] + keyed + [b""]))
        r = _cli("shard", "--source", str(d / "t.csv"), "--output", str(d / "out"),
                 "--samples-per-shard", "6", "--workers", "2", "--max-image-side", "64",
                 "--max-pixels", "1000000", "--url-timeout", "0.5", "--url-retries", "1",
                 "--max-caption-chars", "100", "--key-column", "key", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "rejected: 12" in r.stdout and "repaired: 5" in r.stdout
    bad = [json.loads(x) for x in (d / "out" / "bad_samples.jsonl").read_text().splitlines()]
    by_caption = {rows[b["row"]][1]: b["reason"] for b in bad}
    for name, reason in expected_bad.items():
        assert by_caption[f"bad {name}"] == reason
    assert by_caption[b"not \xff\xfe utf-8"] == "caption_not_utf8"
    assert by_caption[" \t "] == "empty_caption"
    assert by_caption["bad 404"] == "url_http_404"
    assert by_caption["bad timeout"] == "url_timeout"
    assert by_caption["bad refused"] == "url_connection_refused"
    assert by_caption["other caption"] == "duplicate_key"
    assert [b["reason"] for b in bad if b["source_id"] == "t.csv:row" + str(
        next(i for i, r in enumerate(rows) if r[2] == "b-dup-sample"))] == ["duplicate_sample"]
    assert len(bad) == 12 and all(b["source_id"].startswith("t.csv:row") for b in bad)
    samples = read_shards(d / "out")
    captions = {v["txt"].decode(): json.loads(v["json"]) for v in samples.values()}
    for c in good + ["fetched over http"]:
        assert c in captions
    for name in repaired:
        assert captions[f"repair {name}"]["repairs"] and Image.open(
            io.BytesIO(samples[captions[f"repair {name}"]["key"]]["jpg"])).mode == "RGB"
    assert {tuple(m.get("repairs", [])) for m in captions.values()} >= {
        ("cmyk_to_rgb",), ("16bit_to_rgb",), ("palette_to_rgb",), ("alpha_to_rgb",), ("caption_truncated",)}
    long = [c for c in captions if c.startswith("long")]
    assert len(long) == 1 and len(long[0]) <= 100
    m = json.loads((d / "out" / "manifest.json").read_text())
    assert m["totals"]["samples"] == len(samples) == 14 and m["totals"]["rejected"] == 12
    assert m["totals"]["repaired_by_kind"] == {"16bit_to_rgb": 1, "alpha_to_rgb": 1, "caption_truncated": 1,
                                               "cmyk_to_rgb": 1, "palette_to_rgb": 1}


def test_bad_sources_fail_at_once_naming_them(tmp_path: Path) -> None:
    r = _cli("shard", "--source", str(tmp_path / "nope.csv"), "--output", str(tmp_path / "o"),
             "--no-progress")
    assert r.returncode == 2 and "nope.csv" in r.stderr and "does not exist" in r.stderr
    (tmp_path / "t.csv").write_text("url,text\na.jpg,hello\n")
    r = _cli("shard", "--source", str(tmp_path / "t.csv"), "--output", str(tmp_path / "o"), "--no-progress")
    assert r.returncode == 2 and "t.csv" in r.stderr
    assert "'image'" in r.stderr and "['url', 'text']" in r.stderr
    with pytest.raises(SourceError, match="COCO"):
        (tmp_path / "c.json").write_text(json.dumps({"images": []}))
        run_shard_job(ShardJobConfig(source=str(tmp_path / "c.json"), output=str(tmp_path / "o2"),
                                     progress=False))


def test_parallel_jobs_write_disjoint_shards_and_one_manifest(tmp_path: Path) -> None:
    imgs = _images(tmp_path)
    rows = [(p, c) for p, c, _ in imgs] * 1
    for i in range(5, 11):  # more rows: 11 rows / 2 per shard = 6 shards
        (tmp_path / "img" / f"x{i}.jpg").write_bytes(jpeg_bytes(i, (20, 20)))
        rows.append((f"img/x{i}.jpg", f"extra {i}"))
    write_csv(tmp_path / "t.csv", rows)
    single = _run(str(tmp_path / "t.csv"), tmp_path / "single")
    base = dict(source=str(tmp_path / "t.csv"), output=str(tmp_path / "multi"), samples_per_shard=2,
                workers=0, max_image_side=128, progress=False, num_jobs=2)
    s0 = run_shard_job(ShardJobConfig(**base, job_index=0))
    assert s0.manifest is None and not (tmp_path / "multi" / "manifest.json").exists()
    s1 = run_shard_job(ShardJobConfig(**base, job_index=1))  # the last job merges
    assert s1.manifest is not None
    multi = json.loads((tmp_path / "multi" / "manifest.json").read_text())
    assert [s["name"] for s in multi["shards"]] == [s["name"] for s in single["shards"]]
    assert [s["sha256"] for s in multi["shards"]] == [s["sha256"] for s in single["shards"]]
    assert s0.shards == 3 and s1.shards == 3
    # The explicit merge command gives the same manifest.
    (tmp_path / "multi" / "manifest.json").unlink()
    r = _cli("merge-manifests", "--output", str(tmp_path / "multi"))
    assert r.returncode == 0 and "11 samples in 6 shards" in r.stdout
    assert json.loads((tmp_path / "multi" / "manifest.json").read_text()) == multi
    assert merge_manifests(str(tmp_path / "multi")) == multi
