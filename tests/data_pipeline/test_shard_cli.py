"""``python -m data_pipeline shard`` flags are generated from ``ShardJobConfig`` (configcli): every flag maps
to its field as the hand-written CLI did, left-out flags keep the dataclass defaults, and the special cases
(``--ignore-noai``, ``--no-progress``, ``--columns``, ``--job-index`` from ``$JOB_COMPLETION_INDEX``) hold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import jpeg_bytes

from data_pipeline.cli import build_parser, main
from data_pipeline.shard import ShardJobConfig, _config_from_args


def _config(argv: list[str], storage_options: dict | None = None) -> ShardJobConfig:
    return _config_from_args(build_parser().parse_args(["shard", *argv]), storage_options or {})


def test_every_flag_sets_its_field() -> None:
    argv = ["--source", "s3://b/t.tsv", "--output", "out", "--samples-per-shard", "7", "--workers", "3",
            "--max-image-side", "64", "--source-format", "tsv", "--image-column", "url",
            "--caption-column", "text", "--key-column", "id", "--image-root", "imgs", "--prefix", "cc",
            "--max-pixels", "4096", "--jpeg-quality", "80", "--max-caption-chars", "50",
            "--columns", " caption , url", "--vg-max-regions", "4", "--url-timeout", "2.5",
            "--url-retries", "0", "--max-image-bytes", "2048", "--ignore-noai", "--user-agent", "me/1",
            "--fetch-threads", "5", "--chunk-size", "9", "--dedupe-window", "11", "--num-jobs", "3",
            "--job-index", "2", "--no-progress"]
    opts = {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}
    assert _config(argv, opts) == ShardJobConfig(
        source="s3://b/t.tsv", output="out", samples_per_shard=7, workers=3, max_image_side=64,
        source_format="tsv", image_column="url", caption_column="text", key_column="id", image_root="imgs",
        prefix="cc", max_pixels=4096, jpeg_quality=80, max_caption_chars=50, columns=["caption", "url"],
        vg_max_regions=4, url_timeout=2.5, url_retries=0, max_image_bytes=2048, respect_noai=False,
        user_agent="me/1", fetch_threads=5, chunk_size=9, dedupe_window=11, num_jobs=3, job_index=2,
        progress=False, storage_options=opts)


def test_flags_left_out_keep_the_dataclass_defaults() -> None:
    cfg = _config(["--source", "t.csv", "--output", "o"])
    assert cfg == ShardJobConfig(source="t.csv", output="o")
    assert (cfg.respect_noai, cfg.progress, cfg.columns, cfg.job_index) == (True, True, None, 0)
    assert cfg.storage_options == {}


@pytest.mark.parametrize("argv,message", [
    (["--source-format", "xlsx"], "argument --source-format: invalid choice: 'xlsx'"),
    (["--storage-options", "{}"], "unrecognized arguments: --storage-options"),  # filled by --s3-* only
    (["--respect-noai"], "unrecognized arguments: --respect-noai"),  # the switch is --ignore-noai, as before
    (["--workers", "two"], "argument --workers: invalid int value: 'two'"),
])
def test_bad_flags_exit_2_naming_them(argv: list[str], message: str,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["shard", "--source", "t.csv", "--output", "o", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_columns_with_an_empty_name_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An empty name would shift every later column of a header-less file: refused, not dropped."""
    code = main(["shard", "--source", str(tmp_path / "never-read.tsv"), "--output", str(tmp_path / "o"),
                 "--columns", "caption,,url", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert "--columns must be a comma-separated list of distinct names (got caption,,url)" in err
    assert not (tmp_path / "o").exists()


def test_job_index_defaults_to_job_completion_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "images"
    src.mkdir()
    for i in range(3):
        (src / f"p{i}.jpg").write_bytes(jpeg_bytes(i, (20, 16)))
        (src / f"p{i}.txt").write_text(f"picture {i}")
    args = ["shard", "--source", str(src), "--source-format", "folder", "--workers", "0",
            "--samples-per-shard", "1", "--num-jobs", "2", "--no-progress"]
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "x1")
    assert main([*args, "--output", str(tmp_path / "bad")]) == 2
    assert "$JOB_COMPLETION_INDEX must be a non-negative integer (got 'x1')" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()

    monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")
    assert main([*args, "--output", str(tmp_path / "o")]) == 0  # job 1 of 2: shard 1 of 0..2
    work = tmp_path / "o" / "_work"
    assert json.loads((work / "job-00001-of-00002.json").read_text())["shards"] == [1]
    assert not (work / "job-00000-of-00002.json").exists() and not (tmp_path / "o" / "manifest.json").exists()
    assert main([*args, "--output", str(tmp_path / "o"), "--job-index", "0"]) == 0  # the flag wins over env
    assert json.loads((work / "job-00000-of-00002.json").read_text())["shards"] == [0, 2]
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())  # the last job merged
    assert manifest["totals"]["samples"] == 3 and manifest["totals"]["shards"] == 3

    monkeypatch.delenv("JOB_COMPLETION_INDEX")
    assert _config(["--source", "s", "--output", "o"]).job_index == 0  # neither: 0
