"""Real corpus formats (Visual Genome regions, several img2dataset tars, cut tars) and validated flags."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from helpers import jpeg_bytes, read_shards

from data_pipeline.shard import ShardJobConfig, run_shard_job
from data_pipeline.sources import Source, SourceError, iter_json_array

REPO = Path(__file__).resolve().parents[2]


def _bad(out: Path) -> dict[str, str]:
    lines = (out / "bad_samples.jsonl").read_text().splitlines()
    return {b["source_id"]: b["reason"] for b in map(json.loads, lines)}


def _captions(out: Path) -> dict[str, dict]:
    return {v["txt"].decode(): json.loads(v["json"]) for v in read_shards(out).values()}


def test_visual_genome_region_descriptions(tmp_path: Path) -> None:
    root = tmp_path / "vg_images"
    (root / "VG_100K").mkdir(parents=True)
    (root / "VG_100K_2").mkdir()
    (root / "VG_100K" / "1.jpg").write_bytes(jpeg_bytes(1, (60, 40)))
    (root / "VG_100K_2" / "2.jpg").write_bytes(jpeg_bytes(2, (30, 50)))
    regions = [
        {"id": 1, "regions": [{"region_id": 11, "image_id": 1, "phrase": "a red kite", "x": 0, "y": 0},
                              {"region_id": 12, "image_id": 1, "phrase": "clouds in the sky"},
                              {"region_id": 13, "image_id": 1, "phrase": "over the cap, not used"}]},
        {"id": 2, "regions": [{"region_id": 21, "image_id": 2, "phrase": "  "},
                              {"region_id": 22, "image_id": 2, "phrase": "a man on a bench"}]},
        {"id": 3, "regions": [{"region_id": 31, "image_id": 3, "phrase": "image file not there"}]},
        {"regions": "not a list"},
    ]
    src = tmp_path / "region_descriptions.json"
    src.write_text(json.dumps(regions, indent=1))
    out = tmp_path / "out"
    run_shard_job(ShardJobConfig(source=str(src), output=str(out), image_root=str(root), vg_max_regions=2,
                                 samples_per_shard=2, workers=0, max_image_side=32, progress=False))
    m = json.loads((out / "manifest.json").read_text())
    assert m["writer"]["source_format"] == "vg" and m["writer"]["vg_max_regions"] == 2  # told apart from COCO
    caps = _captions(out)
    assert {c: meta["source"] for c, meta in caps.items()} == {
        "a red kite": "vg:image1:region11", "clouds in the sky": "vg:image1:region12",
        "a man on a bench": "vg:image2:region22"}
    man = caps["a man on a bench"]
    assert (man["original_width"], man["original_height"]) == (30, 50)
    assert _bad(out) == {"vg:image2:region21": "empty_caption", "vg:image3:region31": "missing_file",
                         "vg:entry3": "unparseable_row"}


def test_json_array_is_parsed_incrementally() -> None:
    items = [{"id": i, "text": "x" * (i * 37 % 300)} for i in range(200)]
    data = json.dumps(items).encode()
    assert list(iter_json_array(io.BytesIO(data), chunk=64)) == items  # elements straddle every chunk edge
    assert list(iter_json_array(io.BytesIO(b" [1, 22 ,333]"), chunk=2)) == [1, 22, 333]
    with pytest.raises(ValueError, match="Unterminated"):  # cut inside an element
        list(iter_json_array(io.BytesIO(data[: len(data) // 2]), chunk=64))
    with pytest.raises(ValueError, match="not closed"):  # cut between elements
        list(iter_json_array(io.BytesIO(json.dumps(items[:5]).encode()[:-1]), chunk=64))


def _tar(path: Path, samples: list[tuple[str, bytes, str]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, jpg, txt in samples:
            for ext, data in (("jpg", jpg), ("txt", txt.encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def test_webdataset_source_keys_are_unique_across_tars_and_cut_tars_keep_complete_samples(
        tmp_path: Path) -> None:
    wds = tmp_path / "wds"
    wds.mkdir()
    # Two img2dataset runs merged into one folder: both tars hold key 000000000.
    _tar(wds / "00000.tar", [("000000000", jpeg_bytes(1), "from the first tar")])
    _tar(wds / "00001.tar", [("000000000", jpeg_bytes(2), "from the second tar")])
    # A tar cut inside the header of its third member: the first sample (jpg + txt) is complete.
    whole = _tar(tmp_path / "whole.tar", [("a", jpeg_bytes(3), "complete before the cut"),
                                          ("b", jpeg_bytes(4), "cut")])
    # jpg header + body (padded to 512), txt header + body
    first_len = 512 + len(jpeg_bytes(3)) + (-len(jpeg_bytes(3))) % 512 + 512 + 512
    (wds / "00002.tar").write_bytes(whole[: first_len + 200])
    out = tmp_path / "out"
    run_shard_job(ShardJobConfig(source=str(wds), output=str(out), samples_per_shard=2, workers=0,
                                 max_image_side=32, progress=False))
    caps = _captions(out)
    assert {c: m["source_key"] for c, m in caps.items()} == {
        "from the first tar": "00000/000000000", "from the second tar": "00001/000000000",
        "complete before the cut": "00002/a"}
    assert _bad(out) == {"00002.tar:?": "truncated_tar"}


def test_header_less_csv_and_part_globs(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    for i in range(3):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(jpeg_bytes(i))
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "b.csv").write_text("second part,../img/2.jpg\n")
    (tmp_path / "p" / "a.csv").write_text('"first, with a comma",../img/0.jpg\nfirst again,../img/1.jpg\n')
    out = tmp_path / "out"
    run_shard_job(ShardJobConfig(source=str(tmp_path / "p" / "*.csv"), output=str(out),
                                 columns=["caption", "image"], samples_per_shard=2, workers=0,
                                 max_image_side=32, progress=False))
    assert {c: m["source"] for c, m in _captions(out).items()} == {
        "first, with a comma": "a.csv:row0", "first again": "a.csv:row1", "second part": "b.csv:row0"}
    with pytest.raises(SourceError, match=r"--columns"):
        Source(str(tmp_path / "p" / "a.csv"), columns=["caption", "url"])  # no 'image' among the names


@pytest.mark.parametrize("field,value,message", [
    ("max_image_side", 0, "--max-image-side must be an integer in [16, 65536] (got 0)"),
    ("url_retries", -1, "--url-retries must be an integer in [0, 20] (got -1)"),
    ("url_timeout", float("nan"), "--url-timeout must be in (0, 3600] seconds (got nan)"),
    ("url_timeout", 0.0, "--url-timeout must be in (0, 3600] seconds (got 0.0)"),
    ("jpeg_quality", 101, "--jpeg-quality must be an integer in [1, 100] (got 101)"),
    ("fetch_threads", 0, "--fetch-threads must be an integer in [1, 1024] (got 0)"),
    ("max_image_bytes", 10, "--max-image-bytes must be an integer >= 1024 (got 10)"),
    ("samples_per_shard", 0, "--samples-per-shard must be an integer >= 1 (got 0)"),
    ("workers", -2, "--workers must be an integer in [0, 1024] (got -2)"),
    ("job_index", 3, "--job-index must be in [0, --num-jobs 1) (got 3)"),
])
def test_numeric_settings_are_validated_naming_the_flag(tmp_path: Path, field: str, value: object,
                                                         message: str) -> None:
    with pytest.raises(ValueError) as e:
        run_shard_job(ShardJobConfig(source=str(tmp_path / "never-read.csv"), output=str(tmp_path / "o"),
                                     progress=False, **{field: value}))
    assert str(e.value) == message
    assert not (tmp_path / "o").exists()  # checked before anything is touched


def test_cli_rejects_bad_flags_and_names_a_failing_output(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("image,caption\na.jpg,x\n")
    run = lambda *a: subprocess.run([sys.executable, "-m", "data_pipeline", "shard", "--source",  # noqa: E731
                                     str(tmp_path / "t.csv"), "--no-progress", *a], capture_output=True,
                                    text=True, cwd=REPO, timeout=60)
    r = run("--output", str(tmp_path / "o"), "--url-retries", "-1")
    assert r.returncode == 2 and "--url-retries must be an integer in [0, 20] (got -1)" in r.stderr
    assert "Traceback" not in r.stderr
    (tmp_path / "a-file").write_text("not a folder")
    r = run("--output", str(tmp_path / "a-file" / "out"))
    assert r.returncode == 3 and f"output {str(tmp_path / 'a-file' / 'out')!r}" in r.stderr
    assert "rerun the same command to resume" in r.stderr
