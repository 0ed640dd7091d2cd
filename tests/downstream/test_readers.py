"""Readers for the real downstream formats, on hand-written files and on `data_pipeline synth` output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_pipeline.downstream import (
    DownstreamFormatError,
    flatten_captions,
    read_karpathy,
    read_nlvr2,
    read_snli_ve,
    read_vqa,
)


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\xff\xd8\xff")


def test_vqa_v2_questions_and_annotations(tmp_path: Path) -> None:
    q = {"data_subtype": "val2014", "questions": [
        {"image_id": 42, "question": "what color?", "question_id": 420},
        {"image_id": 7, "question": "how many?", "question_id": 70}]}  # fmt: skip
    a = {"annotations": [
        {"question_id": 70, "image_id": 7, "multiple_choice_answer": "2",
         "answers": [{"answer": "2", "answer_id": i} for i in range(10)]},
        {"question_id": 420, "image_id": 42, "multiple_choice_answer": "red",
         "answers": [{"answer": "red" if i < 6 else "dark red", "answer_id": i}
                     for i in range(10)]}]}  # fmt: skip
    (tmp_path / "q.json").write_text(json.dumps(q))
    (tmp_path / "a.json").write_text(json.dumps(a))
    ex = read_vqa(str(tmp_path / "q.json"), "/coco/val2014", str(tmp_path / "a.json"))
    assert [e.question_id for e in ex] == [420, 70]
    assert ex[0].image_path == "/coco/val2014/COCO_val2014_000000000042.jpg"
    assert ex[0].answers.count("red") == 6 and ex[0].multiple_choice_answer == "red"
    assert read_vqa(str(tmp_path / "q.json"), "/x")[1].answers == ()  # test split: no annotations
    a["annotations"].pop()
    (tmp_path / "a.json").write_text(json.dumps(a))
    with pytest.raises(DownstreamFormatError, match=r"questions\[0\]: question_id 420 has no entry"):
        read_vqa(str(tmp_path / "q.json"), "/x", str(tmp_path / "a.json"))


def test_nlvr2_jsonl_finds_both_images_in_nested_dirs(tmp_path: Path) -> None:
    for name in ("train-10171-0-img0.png", "train-10171-0-img1.png"):
        _touch(tmp_path / "images" / "train" / "3" / name)
    rows = [{"identifier": "train-10171-0-0", "sentence": "two dogs", "label": "True", "directory": 3},
            {"identifier": "train-10171-0-1", "sentence": "no dogs", "label": "False",
             "directory": 3}]  # fmt: skip
    (tmp_path / "train.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    ex = read_nlvr2(str(tmp_path / "train.json"), str(tmp_path / "images"))
    assert [e.label for e in ex] == [True, False]
    assert ex[1].image_paths[1].endswith("train/3/train-10171-0-img1.png")
    (tmp_path / "bad.json").write_text(json.dumps({**rows[0], "label": "yes"}) + "\n")
    with pytest.raises(DownstreamFormatError, match=r"bad.json:1: label must be 'True' or 'False'"):
        read_nlvr2(str(tmp_path / "bad.json"), str(tmp_path / "images"))
    (tmp_path / "missing.json").write_text(json.dumps({**rows[0], "identifier": "dev-1-1-0"}) + "\n")
    with pytest.raises(FileNotFoundError, match=r"dev-1-1-img0"):
        read_nlvr2(str(tmp_path / "missing.json"), str(tmp_path / "images"))


def test_snli_ve_labels_keys_and_skipped_gold(tmp_path: Path) -> None:
    rows = [{"Flikr30kID": "123.jpg", "sentence2": "a dog", "gold_label": "contradiction", "pairID": "p1"},
            {"Flickr30K_ID": "9", "sentence2": "a cat", "gold_label": "-", "pairID": "p2"},
            {"Flickr30K_ID": "9", "sentence2": "an animal", "gold_label": "entailment",
             "pairID": "p3"}]  # fmt: skip
    (tmp_path / "dev.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    ex = read_snli_ve(str(tmp_path / "dev.jsonl"), "/flickr")
    assert [(e.pair_id, e.image_path, e.label) for e in ex] == [
        ("p1", "/flickr/123.jpg", 2),
        ("p3", "/flickr/9.jpg", 0),
    ]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"sentence2": "x", "gold_label": "neutral"}) + "\n")
    with pytest.raises(DownstreamFormatError, match=r"bad.jsonl:1: missing field 'Flickr30K_ID'"):
        read_snli_ve(str(tmp_path / "bad.jsonl"), "/flickr")


def test_karpathy_split_coco_and_flickr_paths(tmp_path: Path) -> None:
    data = {"images": [
        {"filepath": "val2014", "filename": "COCO_val2014_1.jpg", "imgid": 0, "split": "test",
         "sentences": [{"raw": "a man", "tokens": ["a", "man"]}, {"tokens": ["a", "boat"]}]},
        {"filename": "55.jpg", "imgid": 1, "split": "train", "sentences": [{"raw": "x"}]},
        {"filename": "56.jpg", "imgid": 2, "split": "restval",
         "sentences": [{"raw": "y"}, {"raw": "z"}]}]}  # fmt: skip
    (tmp_path / "dataset_coco.json").write_text(json.dumps(data))
    test = read_karpathy(str(tmp_path / "dataset_coco.json"), "/coco", "test")
    assert test[0].image_path == "/coco/val2014/COCO_val2014_1.jpg" and test[0].captions == (
        "a man",
        "a boat",
    )
    train = read_karpathy(str(tmp_path / "dataset_coco.json"), "/f30k", ("train", "restval"))
    assert [im.image_path for im in train] == ["/f30k/55.jpg", "/f30k/56.jpg"]
    assert flatten_captions(train) == (["x", "y", "z"], [0, 1, 1])
    assert flatten_captions(train, max_captions=1) == (["x", "y"], [0, 1])
    with pytest.raises(DownstreamFormatError, match="no images in split"):
        read_karpathy(str(tmp_path / "dataset_coco.json"), "/coco", "val")


def test_synthetic_files_read_with_the_real_readers(synthetic: dict) -> None:
    d = synthetic["downstream"]
    vqa = read_vqa(synthetic["vqa_train_questions"], f"{d}/images", synthetic["vqa_train_annotations"])
    assert len(vqa) == synthetic["vqa_train_count"] and all(len(e.answers) == 10 for e in vqa)
    assert all(Path(e.image_path).is_file() for e in vqa)
    nlvr2 = read_nlvr2(synthetic["nlvr2_dev"], f"{d}/images")
    assert len(nlvr2) == synthetic["nlvr2_dev_count"] and {e.label for e in nlvr2} == {True, False}
    snli = read_snli_ve(synthetic["snli_ve_train"], f"{d}/images")
    assert len(snli) == synthetic["snli_ve_train_count"] and {e.label for e in snli} == {0, 1, 2}
    ret = read_karpathy(synthetic["retrieval"], d, "test")
    assert all(Path(im.image_path).is_file() and len(im.captions) >= 2 for im in ret)
