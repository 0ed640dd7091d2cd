"""s3:// end to end against moto's S3 server on 127.0.0.1: write shards, read them back through the loader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import jpeg_bytes, write_csv

from data_pipeline.loader import LoaderConfig, PretrainLoader
from data_pipeline.shard import ShardJobConfig, run_shard_job
from data_pipeline.synth import SynthConfig, make_synthetic

pytestmark = [pytest.mark.integration, pytest.mark.s3]


def test_shard_to_s3_and_load_back(tmp_path: Path, moto_s3) -> None:
    import s3fs

    opts, endpoint = moto_s3
    fs = s3fs.S3FileSystem(**opts)
    fs.mkdir("shards-bucket")
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(9):
        (tmp_path / "img" / f"i{i}.jpg").write_bytes(jpeg_bytes(i, (30, 20)))
        rows.append((f"img/i{i}.jpg", f"caption {i}"))
    rows.append(("img/missing.jpg", "lost"))
    write_csv(tmp_path / "t.csv", rows)
    summary = run_shard_job(ShardJobConfig(source=str(tmp_path / "t.csv"), output="s3://shards-bucket/ds",
                                           samples_per_shard=2, workers=2, max_image_side=64, progress=False,
                                           storage_options=opts))
    assert summary.samples == 9 and summary.rejected == {"missing_file": 1}
    manifest = json.loads(fs.cat("shards-bucket/ds/manifest.json"))
    assert manifest["totals"]["samples"] == 9 and manifest["totals"]["shards"] == 5
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls("shards-bucket/ds"))
    assert names == (["_work", "bad_samples.jsonl", "manifest.json"]
                     + [f"shards-{i:06d}.tar" for i in range(5)])
    assert json.loads(fs.cat("shards-bucket/ds/bad_samples.jsonl"))["reason"] == "missing_file"

    for workers in (0, 2):
        loader = PretrainLoader(LoaderConfig(urls="s3://shards-bucket/ds/manifest.json", batch_size=3,
                                             max_image_side=32, storage_options=opts, epochs=1,
                                             num_workers=workers))
        keys = [k for b in loader for k in b["keys"]]
        assert sorted(keys) == [f"{i:012d}" for i in range(9)]


def test_synthetic_data_on_s3(moto_s3) -> None:
    import s3fs

    opts, _ = moto_s3
    s3fs.S3FileSystem(**opts).mkdir("synth-bucket")
    cfg = SynthConfig(samples_per_shard=4, vqa_images=(2, 1), nlvr2_pairs=(2, 1), snli_ve_images=(1, 1),
                      retrieval_images=(2, 1, 1))
    r = make_synthetic("s3://synth-bucket/synth", num=8, seed=0, image_size=32, config=cfg,
                       storage_options=opts)
    assert r["pretrain_manifest"] == "s3://synth-bucket/synth/pretrain/manifest.json"
    loader = PretrainLoader(LoaderConfig(urls=r["pretrain_manifest"], batch_size=4, max_image_side=32,
                                         storage_options=opts, epochs=1))
    assert sorted(k for b in loader for k in b["keys"]) == [f"p{i:08d}" for i in range(8)]
