"""Fine-tuning that survives: committed checkpoints through pre-training's store, automatic resume at the
saved step with the same next batch and the same optimiser state, loader workers that change no batch, and
the VQA result file of an unlabelled split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from data_pipeline.downstream import TaskCollator, TaskDataConfig, read_vqa
from orchestration.finetune.config import FinetuneConfig
from orchestration.finetune.standard_metrics import vqa_official_accuracy
from orchestration.finetune.tasks import TASKS
from orchestration.finetune.worker import TaskBatches, batch_loader, finetune_worker
from orchestration.runtime.checkpoint import (
    COMMITTED,
    DS_TAG,
    StorageStore,
    deepspeed_safe_globals,
    step_dir_name,
    verify_local,
)
from orchestration.runtime.engine_checkpoint import TORCH_ENGINE_FILE
from soho.downstream.modeling import load_task_model

TRAIN_QUESTIONS = 24  # micro batch 8 → 3 batches per epoch


def _subset(synthetic: dict, tmp: Path, n: int, split: str = "train") -> tuple[str, str]:
    """The first n questions of a synthetic VQA split (+ their annotations) as real VQA v2 files."""
    q = json.loads(Path(synthetic[f"vqa_{split}_questions"]).read_text())
    q["questions"] = q["questions"][:n]
    keep = {x["question_id"] for x in q["questions"]}
    a = json.loads(Path(synthetic[f"vqa_{split}_annotations"]).read_text())
    a["annotations"] = [x for x in a["annotations"] if x["question_id"] in keep]
    qp, ap = tmp / f"{split}{n}_questions.json", tmp / f"{split}{n}_annotations.json"
    qp.write_text(json.dumps(q))
    ap.write_text(json.dumps(a))
    return str(qp), str(ap)


def _cfg(synthetic: dict, tmp: Path, name: str, **kw) -> FinetuneConfig:
    train_q, train_a = _subset(synthetic, tmp, TRAIN_QUESTIONS)
    base = dict(task="vqa", data=synthetic["downstream"], train_file=train_q, train_annotations=train_a,
                output=str(tmp / name), image_size=64, micro_batch_size=8, lr=1e-3, warmup_steps=1,
                progress=False, log_every=100, eval_batch_size=32, skip_eval=True, loader_workers=0,
                checkpoint_every=2, keep_checkpoints=3, run_name="ft")  # fmt: skip
    base.update(kw)
    return FinetuneConfig.of(**base)


def _ckpt_tensors(root: Path, step: int) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """(module weights, every optimiser moment) of the committed checkpoint at ``step`` (ZeRO-0 layout)."""
    d = root / "ft" / "checkpoints" / step_dir_name(step)
    assert (d / COMMITTED).is_file()
    verify_local(d)
    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        saved = torch.load(d / DS_TAG / "mp_rank_00_model_states.pt", map_location="cpu",
                           weights_only=True)
    state = saved["optimizer"]["state"]
    moments = [state[i][k] for i in sorted(state) for k in ("exp_avg", "exp_avg_sq")]
    return saved["module"], moments


def _close(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b) and len(a) > 0
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        assert x.shape == y.shape
        worst = max(worst, (x.float() - y.float()).abs().max().item())
    return worst


@pytest.mark.slow
@pytest.mark.integration
def test_stopped_run_resumes_exactly(synthetic: dict, tmp_path: Path) -> None:
    """A: 2 epochs straight (6 steps). B: the same run stopped by --max-steps 3, then relaunched without it
    (and with 2 loader workers): it resumes by itself at step 3, batch 0 of epoch 1 is next, and its
    optimiser moments and weights at steps 4 and 6 equal A's. Tolerance: 1e-6 absolute (fp32 on CPU; the
    measured difference is 0: same batches, same RNG, same arithmetic)."""
    a = finetune_worker(_cfg(synthetic, tmp_path, "a", epochs=2))
    assert a["steps"] == a["planned_steps"] == 6 and a["batches_per_epoch"] == 3 and a["resumed_from"] is None
    assert [h["epoch"] for h in a["history"]] == [0, 0, 0, 1, 1, 1]

    b1 = finetune_worker(_cfg(synthetic, tmp_path, "b", epochs=2, max_steps=3))
    assert b1["steps"] == 3 and b1["planned_steps"] == 6
    store = StorageStore(str(tmp_path / "b"), "ft", keep=3)
    assert store.committed_steps() == [3, 2]  # every 2 steps, and where the run stopped
    # same lr schedule (it spans the 6 planned steps), so the first 3 steps are A's
    losses_a = [h["loss"] for h in a["history"]]
    assert [h["loss"] for h in b1["history"]] == pytest.approx(losses_a[:3], abs=1e-6)

    b2 = finetune_worker(_cfg(synthetic, tmp_path, "b", epochs=2, loader_workers=2))
    assert b2["resumed_from"] == b2["start_step"] == 3 and b2["steps"] == 6
    assert [h["step"] for h in b2["history"]] == [1, 2, 3, 4, 5, 6]  # steps 1-3 from the history log
    assert b2["history"][:3] == b1["history"]
    assert [h["epoch"] for h in b2["history"][3:]] == [1, 1, 1]
    # step 4 trains on the batch A trained on at step 4, from the same weights and moments: the same loss
    assert [h["loss"] for h in b2["history"][3:]] == pytest.approx(losses_a[3:], abs=1e-6)
    assert store.committed_steps() == [6, 4, 3]

    worst = 0.0
    for step in (4, 6):
        wa, ma = _ckpt_tensors(tmp_path / "a", step)
        wb, mb = _ckpt_tensors(tmp_path / "b", step)
        assert sorted(wa) == sorted(wb)
        worst = max(worst, _close(ma, mb), _close([wa[k] for k in sorted(wa)], [wb[k] for k in sorted(wb)]))
    state4 = json.loads((tmp_path / "b" / "ft" / "checkpoints" / step_dir_name(4) / "train_state.json")
                        .read_text())  # fmt: skip
    position = (state4["step"], state4["epoch"], state4["batch_in_epoch"], state4["batches_per_epoch"])
    assert position == (4, 1, 1, 3)
    vocab = json.loads((tmp_path / "a" / "model" / "answers.json").read_text())["answers"]
    assert state4["answer_vocab"] == vocab
    # the exported models (as before: {output}/model) are the same too
    ea, eb = load_task_model(tmp_path / "a" / "model"), load_task_model(tmp_path / "b" / "model")
    sa, sb = ea.state_dict(), eb.state_dict()
    worst = max(worst, _close([sa[k] for k in sorted(sa)], [sb[k] for k in sorted(sb)]))
    print(f"resumed vs uninterrupted: max |difference| of weights and optimiser moments {worst:.3g}")
    assert worst <= 1e-6

    # A relaunch with other options is refused, naming them; a finished run relaunched trains nothing.
    with pytest.raises(RuntimeError, match=r"other options \(lr: 0.001 → 0.002"):
        finetune_worker(_cfg(synthetic, tmp_path, "b", epochs=2, lr=2e-3))
    again = finetune_worker(_cfg(synthetic, tmp_path, "b", epochs=2))
    assert again["resumed_from"] == 6 and again["steps"] == 6 and len(again["history"]) == 6


def test_loader_workers_and_resume_position_give_the_same_batches(synthetic: dict, tmp_path: Path) -> None:
    train_q, train_a = _subset(synthetic, tmp_path, 20)
    cfg = FinetuneConfig.of(task="vqa", data=synthetic["downstream"], micro_batch_size=4, seed=3)
    examples = read_vqa(train_q, synthetic["downstream"] + "/images", train_a)
    collator = TaskCollator(TaskDataConfig(max_image_side=64, pad_multiple=32))

    def run(workers: int, start: int, rank: int = 0, world: int = 1) -> list[dict]:
        batches = TaskBatches(cfg, TASKS["vqa"], examples, collator, rank, world)
        return list(batch_loader(batches, start, 12, workers, cfg.seed))

    serial, parallel, resumed = run(0, 0), run(2, 0), run(2, 7)
    assert len(serial) == len(parallel) == 12 and len(resumed) == 5  # 5 batches per epoch, 2.4 epochs
    for one, other in zip(serial, parallel, strict=True):
        assert one["question_ids"].tolist() == other["question_ids"].tolist()
        assert torch.equal(one["pixel_values"], other["pixel_values"])
        assert torch.equal(one["input_ids"], other["input_ids"])
    assert [b["question_ids"].tolist() for b in resumed] == [b["question_ids"].tolist() for b in serial[7:]]
    # an epoch is every example once (20 = 5 batches × 4); the next epoch is another order
    first = sorted(q for b in serial[:5] for q in b["question_ids"].tolist())
    assert first == sorted(e.question_id for e in examples)
    ids = [b["question_ids"].tolist() for b in serial]
    assert ids[5:10] != ids[:5]
    # two ranks: 2 batches per epoch each (20 // (4 × 2)), disjoint within an epoch
    r0, r1 = run(0, 0, 0, 2), run(0, 0, 1, 2)
    ids0 = {q for b in r0[:2] for q in b["question_ids"].tolist()}
    ids1 = {q for b in r1[:2] for q in b["question_ids"].tolist()}
    assert len(ids0) == len(ids1) == 8 and not ids0 & ids1


@pytest.mark.slow
@pytest.mark.integration
def test_vqa_predict_split_result_file_and_official_accuracy(synthetic: dict, tmp_path: Path) -> None:
    """--predict-split writes the submission file; scored against the annotations of the same questions it
    gives exactly the ``overall`` the evaluation reported (the eval split's first 16 questions here)."""
    val_q, val_a = _subset(synthetic, tmp_path, 16, split="val")
    res = finetune_worker(_cfg(synthetic, tmp_path, "p", max_steps=2, checkpoint_every=0, skip_eval=False,
                               eval_limit=16, predict_split="test-dev", predict_file=val_q))
    assert res["checkpoints"] is None and not (tmp_path / "p" / "ft").exists()  # --checkpoint-every 0: none
    path = tmp_path / "p" / "vqa_test-dev_results.json"
    assert res["predictions"]["file"] == str(path) and res["predictions"]["questions"] == 16
    rows = json.loads(path.read_text())
    questions = json.loads(Path(val_q).read_text())["questions"]
    assert [r["question_id"] for r in rows] == [q["question_id"] for q in questions]
    assert all(set(r) == {"question_id", "answer"} and isinstance(r["question_id"], int)
               and isinstance(r["answer"], str) for r in rows)  # fmt: skip
    vocab = json.loads((tmp_path / "p" / "model" / "answers.json").read_text())["answers"]
    assert all(r["answer"] in vocab for r in rows)
    humans = {x["question_id"]: [y["answer"] for y in x["answers"]]
              for x in json.loads(Path(val_a).read_text())["annotations"]}  # fmt: skip
    rescored = vqa_official_accuracy([r["answer"] for r in rows], [humans[r["question_id"]] for r in rows])
    ev = res["eval"]
    assert ev["num_examples"] == 16 and ev["overall"] == pytest.approx(rescored["overall"])
    assert set(ev["perAnswerType"]) <= {"yes/no", "number", "other"}
    # synthetic answers are unanimous and already normalised: the server's figure equals ours (in %)
    assert ev["overall"] == pytest.approx(100 * ev["vqa_accuracy"])


@pytest.mark.slow
@pytest.mark.integration
def test_torch_engine_resumes_to_the_same_weights(synthetic: dict, tmp_path: Path) -> None:
    """--engine torch keeps its model and optimiser in ds/torch_engine.pt (weights-only, verified like
    DeepSpeed's files): one epoch straight vs stopped after step 1 and relaunched; tolerance 1e-6."""
    kw = dict(engine="torch", epochs=1, checkpoint_every=5)
    a = finetune_worker(_cfg(synthetic, tmp_path, "a", **kw))
    finetune_worker(_cfg(synthetic, tmp_path, "b", max_steps=1, **kw))
    b = finetune_worker(_cfg(synthetic, tmp_path, "b", **kw))
    assert a["steps"] == b["steps"] == 3 and b["resumed_from"] == 1
    assert [h["loss"] for h in b["history"]] == pytest.approx([h["loss"] for h in a["history"]], abs=1e-6)
    states = []
    for run in ("a", "b"):
        d = tmp_path / run / "ft" / "checkpoints" / step_dir_name(3)
        verify_local(d)  # the torch state file is in rank 0's record and loads weights-only
        states.append(torch.load(d / DS_TAG / TORCH_ENGINE_FILE, map_location="cpu", weights_only=True))
    moments = [[s["optimizer"]["state"][i][k] for i in sorted(s["optimizer"]["state"])
                for k in ("exp_avg", "exp_avg_sq")] for s in states]  # fmt: skip
    weights = [[s["module"][k] for k in sorted(s["module"])] for s in states]
    assert _close(*moments) <= 1e-6 and _close(*weights) <= 1e-6
