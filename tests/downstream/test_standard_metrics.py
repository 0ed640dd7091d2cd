"""The papers' figures on hand-made cases with known scores: VQA accuracy as the evaluation server computes
it (normalisation, leave-one-human-out averaging), retrieval r_mean / RSUM, the VQA result-file format, and
the fine-tuning options around them (--epochs, resume refusals)."""

from __future__ import annotations

import pytest

import configcli
from data_pipeline.downstream import VQAExample
from orchestration.finetune.config import FinetuneConfig, parse_config
from orchestration.finetune.standard_metrics import (
    CONTRACTIONS,
    normalize_vqa_prediction,
    retrieval_summary,
    vqa_official_accuracy,
    vqa_official_score,
    vqa_punctuation,
)
from orchestration.finetune.tasks import vqa_result_file, with_retrieval_summary
from orchestration.finetune.worker import check_resumable


@pytest.mark.parametrize(
    ("raw", "norm"),
    [
        ("Yes.", "yes"),                      # lower case, trailing period
        ("Two", "2"), ("none", "0"), ("ten dogs", "10 dogs"),
        ("2.5", "2.5"), ("2.", "2"), ("mr. smith", "mr smith"),  # a period stays only before a digit
        ("1,000", "1000"),                    # a comma between digits is deleted, not spaced
        ("red,white", "red white"),           # punctuation not next to a space becomes a space
        ("red, white", "red white"),          # ... and next to a space it is deleted
        ("t-shirt", "t shirt"), ("(left)", "left"),
        ("1,000-2", "10002"),                 # the answer holds digit,digit: every mark is deleted
        ("a dog", "dog"), ("The Cat", "cat"), ("an", ""),
        ("dont", "don't"), ("isnt", "isn't"), ("couldntve", "couldn't've"), ("couldn'tve", "couldn't've"),
        ("youre right", "you're right"), ("its", "its"), ("well", "well"),  # English words stay
        ("50%", "50%"), ("3:00", "3:00"), ("o'clock", "o'clock"),  # % : ' are not punctuation here
        ("  Two\tdogs\n", "2 dogs"),
    ],
)  # fmt: skip
def test_vqa_prediction_normalisation(raw: str, norm: str) -> None:
    assert normalize_vqa_prediction(raw) == norm


def test_contraction_table_covers_half_written_forms_only() -> None:
    assert CONTRACTIONS["wont"] == "won't" and CONTRACTIONS["id've"] == "i'd've"
    assert all("'" in full for full in CONTRACTIONS.values())
    words = {"its", "well", "were", "hell", "shell", "ill", "id", "wed", "shed", "lets"}
    assert not words & set(CONTRACTIONS)
    # each mark on its own: "-" touches no space (→ a space), "," does (→ deleted)
    assert vqa_punctuation("a-b, c") == "a b c" and vqa_punctuation("what?!") == "what  "


@pytest.mark.parametrize(("matches", "expected"),
                         [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_leave_one_human_out(matches: int, expected: float) -> None:
    # 10 choose 9 subsets: each of the `matches` agreeing humans left out once leaves matches-1 of them
    humans = ["cat"] * matches + ["dog"] * (10 - matches)
    assert vqa_official_score("cat", humans) == pytest.approx(expected)


def test_official_accuracy_of_a_small_set() -> None:
    humans = [
        ["2"] * 2 + ["3"] * 8,                   # "two" → "2", 2 of 10 → 0.6
        ["yes"] * 10,                            # "Yes." → "yes": 1.0
        ["t-shirt"] * 10,                        # unanimous: compared as written, "t shirt" ≠ "t-shirt": 0
        ["t-shirt"] * 5 + ["shirt"] * 5,         # not unanimous: humans' "-" spaced too: 5 → 1.0
        ["red"] * 9 + ["blue"],                  # 1 → 0.3
        ["dog", "dog", "cat", "cat", "cat"],     # 5 humans: (2·min(1,1/3) + 3·min(1,2/3)) / 5 = 8/15
    ]  # fmt: skip
    preds = ["two", "Yes.", "t-shirt", "T-Shirt", "blue", "dog"]
    types = ["number", "yes/no", "other", "other", "other", "other"]
    expected = [0.6, 1.0, 0.0, 1.0, 0.3, 8 / 15]
    assert [vqa_official_score(p, h) for p, h in zip(preds, humans, strict=True)] == pytest.approx(expected)
    out = vqa_official_accuracy(preds, humans, types)
    assert out["overall"] == pytest.approx(100 * sum(expected) / 6)
    assert out["perAnswerType"] == {"number": pytest.approx(60.0), "yes/no": pytest.approx(100.0),
                                    "other": pytest.approx(100 * (0 + 1 + 0.3 + 8 / 15) / 4)}  # fmt: skip
    assert "perAnswerType" not in vqa_official_accuracy(preds, humans)
    with pytest.raises(ValueError, match="2 predictions for 6 questions"):
        vqa_official_accuracy(preds[:2], humans)
    with pytest.raises(ValueError, match="no human answers"):
        vqa_official_score("x", [])


def test_retrieval_r_mean_and_rsum() -> None:
    recalls = {"i2t_r1": 40.0, "i2t_r5": 70.0, "i2t_r10": 80.0, "t2i_r1": 30.0, "t2i_r5": 60.0,
               "t2i_r10": 75.5, "pairs_scored": 12345}  # fmt: skip
    assert retrieval_summary(recalls) == {"r_mean": pytest.approx(355.5 / 6), "rsum": pytest.approx(355.5)}
    # in an evaluation's output: beside each ranking's recalls, and the headline (exhaustive when it ran)
    fast = {**recalls, "i2t_r1": 46.0}
    out = with_retrieval_summary({"fast": dict(fast), "exhaustive": dict(recalls), "k": 16})
    assert out["fast"]["rsum"] == pytest.approx(361.5) and out["exhaustive"]["rsum"] == pytest.approx(355.5)
    assert (out["r_mean"], out["rsum"]) == (pytest.approx(355.5 / 6), pytest.approx(355.5))
    assert with_retrieval_summary({"fast": dict(fast)})["rsum"] == pytest.approx(361.5)
    with pytest.raises(ValueError, match=r"missing \['t2i_r10'\]"):
        retrieval_summary({k: v for k, v in recalls.items() if k != "t2i_r10"})


def test_vqa_result_file_format() -> None:
    qs = [VQAExample(7, 1, "/x.jpg", "what?", (), None), VQAExample(3, 1, "/x.jpg", "how many?", (), None)]
    assert vqa_result_file(qs, ["red", "2"]) == [{"question_id": 7, "answer": "red"},
                                                 {"question_id": 3, "answer": "2"}]  # fmt: skip
    with pytest.raises(ValueError, match="question_id 7 appears twice"):
        vqa_result_file([qs[0], qs[0]], ["a", "b"])


def test_epochs_set_the_step_count_and_max_steps_cuts_it() -> None:
    cfg = parse_config(["--epochs", "3"], "t")
    assert cfg.optim.max_steps == 0 and cfg.planned_steps(7) == (21, 21)
    assert parse_config(["--epochs", "3", "--max-steps", "5"], "t").planned_steps(7) == (21, 5)
    assert FinetuneConfig.of(epochs=3, max_steps=40).planned_steps(7) == (21, 21)
    assert FinetuneConfig.of(max_steps=12).planned_steps(7) == (12, 12)  # without --epochs: --max-steps
    with pytest.raises(ValueError, match="--epochs 0 must be >= 1"):
        FinetuneConfig.of(epochs=0)
    with pytest.raises(ValueError, match="--predict-split 'test-dev': only VQA"):
        FinetuneConfig.of(task="nlvr2", predict_split="test-dev")


def test_resume_refuses_what_it_cannot_continue_exactly() -> None:
    cfg = FinetuneConfig.of(task="vqa", epochs=2, lr=1e-3)
    started = FinetuneConfig.of(task="vqa", epochs=1, lr=1e-3, loader_workers=0)
    state = {"world_size": 1, "batches_per_epoch": 4, "task": "vqa", "config": configcli.to_flat(started)}
    check_resumable(cfg, state, 1, 4, "ckpt")  # --epochs / --loader-workers may change
    with pytest.raises(RuntimeError, match="written by 1 workers, this run has 2"):
        check_resumable(cfg, state, 2, 4, "ckpt")
    with pytest.raises(RuntimeError, match=r"other options \(lr: 0.001 → 0.0005"):
        check_resumable(cfg.replace(lr=5e-4), state, 1, 4, "ckpt")
    with pytest.raises(RuntimeError, match="gave 4 batches per epoch, now it gives 5"):
        check_resumable(cfg, state, 1, 5, "ckpt")
    with pytest.raises(RuntimeError, match="ckpt: not a fine-tuning checkpoint, this is --task vqa"):
        check_resumable(cfg, {"world_size": 1, "step": 7, "samples_seen": 9}, 1, 4, "ckpt")  # pre-training's
    with pytest.raises(RuntimeError, match="a 'nlvr2' fine-tuning checkpoint, this is --task vqa"):
        check_resumable(cfg, {**state, "task": "nlvr2"}, 1, 4, "ckpt")
