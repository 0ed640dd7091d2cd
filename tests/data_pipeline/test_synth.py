"""Synthetic scenes: deterministic, idempotent, captions grounded in the scene graph, downstream formats."""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

import pytest
from helpers import read_shards

from data_pipeline.synth import (
    SYNTHETIC_CACHE_VERSION,
    SynthConfig,
    cache_name,
    make_caption,
    make_synthetic,
    relation,
    sample_scene,
)

SMALL = SynthConfig(samples_per_shard=10, vqa_images=(3, 2), nlvr2_pairs=(4, 2), snli_ve_images=(2, 2),
                    retrieval_images=(3, 2, 2))


def _digest(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.glob("*.tar"))}


def test_deterministic_by_seed_and_idempotent(tmp_path: Path) -> None:
    a = make_synthetic(str(tmp_path / "a"), num=30, seed=5, heldout=8, image_size=40, config=SMALL)
    make_synthetic(str(tmp_path / "b"), num=30, seed=5, heldout=8, image_size=40, config=SMALL)
    make_synthetic(str(tmp_path / "c"), num=30, seed=6, heldout=8, image_size=40, config=SMALL)
    assert a["pretrain_count"] == 30 and a["heldout_count"] == 8
    da, db, dc = (_digest(tmp_path / x / "pretrain") for x in "abc")
    assert da == db and len(da) == 3
    assert da != dc
    # Idempotent: a second call rewrites nothing and returns the recorded result.
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "a").rglob("*") if p.is_file()}
    again = make_synthetic(str(tmp_path / "a"), num=30, seed=5, heldout=8, image_size=40, config=SMALL)
    assert again == a
    assert mtimes == {p: p.stat().st_mtime_ns for p in (tmp_path / "a").rglob("*") if p.is_file()}


def test_shards_follow_contract_and_heldout_is_disjoint(tmp_path: Path) -> None:
    r = make_synthetic(str(tmp_path), num=40, seed=1, heldout=15, image_size=32, config=SMALL)
    manifest = json.loads(Path(r["pretrain_manifest"]).read_text())
    samples = read_shards(tmp_path / "pretrain")
    assert manifest["totals"]["samples"] == len(samples) == 40
    for s in manifest["shards"]:
        assert hashlib.sha256((tmp_path / "pretrain" / s["name"]).read_bytes()).hexdigest() == s["sha256"]
    sigs = set()
    for v in samples.values():
        meta = json.loads(v["json"])
        assert meta["width"] == meta["height"] == 32
        assert hashlib.sha256(v["jpg"]).hexdigest() == meta["sha256"]
        sigs.add(json.dumps(sorted(json.dumps(o, sort_keys=True) for o in meta["scene"]["objects"])))
    held = read_shards(tmp_path / "heldout")
    assert len(held) == 15
    for v in held.values():
        objs = json.loads(v["json"])["scene"]["objects"]
        assert json.dumps(sorted(json.dumps(o, sort_keys=True) for o in objs)) not in sigs
    assert (tmp_path / "pretrain" / "bad_samples.jsonl").read_text() == ""


def test_captions_name_every_object_and_true_relations() -> None:
    rng = random.Random(0)
    relations_seen = set()
    for _ in range(300):
        scene = sample_scene(rng)
        cap = make_caption(scene, rng)
        for o in scene.objects:  # attributes of every object (counts group identical ones)
            assert o.colour in cap and o.shape in cap and o.size in cap, (cap, scene)
        for a in scene.objects:
            for b in scene.objects:
                if a is b:
                    continue
                phrase = f"{a.phrase('the')} is {relation(a, b)} {b.phrase('the')}"
                wrong = {"to the left of": "to the right of", "to the right of": "to the left of",
                         "above": "below", "below": "above"}[relation(a, b)]
                if phrase in cap:
                    relations_seen.add(relation(a, b))
                # A stated relation between two uniquely described objects is never the wrong one.
                if sum(o.phrase() == a.phrase() for o in scene.objects) == 1 and sum(
                        o.phrase() == b.phrase() for o in scene.objects) == 1:
                    assert f"{a.phrase('the')} is {wrong} {b.phrase('the')}" not in cap, cap
    assert relations_seen == {"to the left of", "to the right of", "above", "below"}


def test_downstream_files_in_dataset_formats(tmp_path: Path) -> None:
    r = make_synthetic(str(tmp_path), num=10, seed=2, image_size=32, config=SMALL)
    ds = tmp_path / "downstream"
    q = json.loads((ds / "vqa" / "train_questions.json").read_text())
    a = json.loads((ds / "vqa" / "train_annotations.json").read_text())
    assert len(q["questions"]) == len(a["annotations"]) == r["vqa_train_count"] > 0
    by_qid = {x["question_id"]: x for x in a["annotations"]}
    for qq in q["questions"]:
        ann = by_qid[qq["question_id"]]
        assert ann["image_id"] == qq["image_id"] and len(ann["answers"]) == 10
        assert (ds / "images" / f"COCO_train2014_{qq['image_id']:012d}.jpg").is_file()
        if qq["question"] == "how many objects are there?":
            assert ann["multiple_choice_answer"] in {"1", "2", "3", "4"}
    nl = [json.loads(x) for x in (ds / "nlvr2" / "train.jsonl").read_text().splitlines()]
    assert len(nl) == 4 and {x["label"] for x in nl} <= {"True", "False"}
    for x in nl:
        stem = x["identifier"].rsplit("-", 1)[0]
        assert (ds / "images" / f"{stem}-img0.jpg").is_file()
        assert (ds / "images" / f"{stem}-img1.jpg").is_file()
    ve = [json.loads(x) for x in (ds / "snli_ve" / "dev.jsonl").read_text().splitlines()]
    assert sorted(x["gold_label"] for x in ve) == ["contradiction", "contradiction", "entailment",
                                                   "entailment", "neutral", "neutral"]
    assert all((ds / "images" / x["Flikr30kID"]).is_file() and x["Flikr30kID"] == x["Flickr30K_ID"] + ".jpg"
               for x in ve)
    ret = json.loads((ds / "retrieval" / "dataset_synth.json").read_text())
    assert [i["split"] for i in ret["images"]].count("test") == 2
    assert all(len(i["sentences"]) == SMALL.retrieval_captions_per_image
               and (ds / "images" / i["filename"]).is_file() for i in ret["images"])


def test_synth_cli_and_memory_url() -> None:
    import fsspec

    from data_pipeline.cli import main

    assert main(["synth", "--num", "12", "--output", "memory://synth-cli", "--seed", "4",
                 "--image-size", "32", "--samples-per-shard", "5"]) == 0
    fs = fsspec.filesystem("memory")
    manifest = json.loads(fs.cat("/synth-cli/pretrain/manifest.json"))
    assert [s["samples"] for s in manifest["shards"]] == [5, 5, 2]


def test_cache_name_is_one_folder_per_version_pairs_seed_and_heldout() -> None:
    # The names the embedded default data has always had (an existing cache stays valid).
    assert SYNTHETIC_CACHE_VERSION == 1
    assert cache_name(2000, 0) == "synthetic-v1-n2000-s0"
    assert cache_name(2000, 3, heldout=100) == "synthetic-v1-n2000-s3-heldout100"
    assert cache_name(2000, 3, heldout=0) == cache_name(2000, 3)
    names = {cache_name(p, s, h) for p in (10, 2000) for s in (0, 1) for h in (0, 100)}
    assert len(names) == 8  # no two settings share a folder
    for args, message in (((0, 0), "pairs must be an integer >= 1 (got 0)"),
                          ((10, -1), "seed must be an integer >= 0 (got -1)"),
                          ((10, 0, -5), "heldout must be an integer >= 0 (got -5)"),
                          ((10.0, 0), "pairs must be an integer >= 1 (got 10.0)")):
        with pytest.raises(ValueError, match=re.escape(message)):
            cache_name(*args)
