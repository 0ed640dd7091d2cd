"""The fine-tuning worker: one rank's training loop for any task of
:data:`orchestration.finetune.tasks.TASKS`.

Ray-free like the pre-training loop: it runs on an existing ``torch.distributed`` process group (Ray Train's,
torchrun's) or makes a one-process gloo group (:mod:`orchestration.runtime.distributed`), builds its engine
with :func:`orchestration.runtime.engine.build_engine` (DeepSpeed, or plain torch with ``--engine torch``:
DDP when world > 1), sets the learning rate per step with :mod:`orchestration.runtime.schedule`, and sums
the visual dictionary's statistics over ranks. Rank 0 evaluates, saves the task model (``{output}/model``)
and writes ``{output}/results.json``.

Checkpoints (``--checkpoint-every N``, and at the end): committed through pre-training's
:class:`~orchestration.runtime.checkpoint.StorageStore` under ``{--storage-path (default --output)}/{run
name}/checkpoints/`` — the same layout, rank records, commit marker, verification and retention. A launch
finds the run's newest committed checkpoint by itself and continues from it: step, epoch and position in
the epoch (a pure function of the step, :class:`TaskBatches`), model and optimiser state, the RNG of every
rank, the VQA answer vocabulary, and the per-step history.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

import configcli
from data_pipeline.downstream import TaskCollator, TaskDataConfig
from orchestration.finetune.config import FinetuneConfig
from orchestration.finetune.tasks import TASKS, Task, build_task_model, predict_vqa, vqa_result_file
from orchestration.runtime.checkpoint import HistoryLog, LocalCheckpoint, StorageStore, read_rank_record
from orchestration.runtime.distributed import (
    all_agree,
    destroy_process_group,
    ensure_process_group,
    rng_state,
    set_rng_state,
    step_generator,
    sum_over_ranks,
    tensor_sha256,
    unwrap,
    visual_dictionary,
)
from orchestration.runtime.engine import build_engine
from orchestration.runtime.engine_checkpoint import commit_checkpoint, load_engine_state, save_engine_state
from orchestration.runtime.loggers import RunLogger
from orchestration.runtime.schedule import apply_lr
from soho.downstream.modeling import load_task_model
from soho.downstream.vqa import AnswerVocab

logger = logging.getLogger(__name__)

RESULTS_NAME = "results.json"
ANSWERS_NAME = "answers.json"
PREDICTIONS_NAME = "vqa_{split}_results.json"


class TaskBatches(torch.utils.data.Dataset):
    """One rank's batches over the whole run, addressed by batch number (= optimizer step).

    Batch ``g`` is batch ``i = g % per_epoch`` of epoch ``e = g // per_epoch``: epoch ``e`` shuffles the
    examples by (seed, e), rank r takes every world-th one, and batch i is the i-th chunk of that share.
    ``per_epoch = len(examples) // (micro batch × world)`` is the same on every rank (the remainder of a
    shuffled epoch is left out, as ``drop_last`` does), so each step takes exactly one batch on every rank
    and the step number alone says where in which epoch a run is: a resumed run continues with exactly the
    batches the interrupted one had not trained on. A batch is a pure function of (seed, g, rank, world),
    whichever process builds it, so DataLoader workers (:func:`batch_loader`) change nothing in the
    batches."""

    def __init__(self, cfg: FinetuneConfig, task: Task, examples: list[Any], collator: TaskCollator,
                 rank: int, world: int) -> None:
        self.size = cfg.scale.micro_batch_size
        self.per_epoch = self.batches_per_epoch(len(examples), self.size, world, cfg.task)
        self.seed, self.task, self.examples, self.collator = cfg.seed, task, examples, collator
        self.rank, self.world = rank, world
        self._order: tuple[int, list[int]] | None = None

    @staticmethod
    def batches_per_epoch(examples: int, micro_batch: int, world: int, task: str = "") -> int:
        if examples < micro_batch * world:
            raise ValueError(
                f"{task}: {examples} training examples < micro batch {micro_batch} × {world} workers")
        return examples // (micro_batch * world)

    def position(self, g: int) -> tuple[int, int]:
        """(epoch, batch within the epoch) of batch number ``g``."""
        return divmod(g, self.per_epoch)

    def indices(self, g: int) -> list[int]:
        """The example indices of this rank's batch number ``g``."""
        epoch, i = self.position(g)
        if self._order is None or self._order[0] != epoch:
            order = list(range(len(self.examples)))
            random.Random(f"{self.seed}/finetune/{epoch}").shuffle(order)
            self._order = (epoch, order[self.rank :: self.world])
        return self._order[1][i * self.size : (i + 1) * self.size]

    def __getitem__(self, g: int) -> dict[str, Any]:
        epoch, _ = self.position(g)
        return self.task.collate(self.collator, [self.examples[i] for i in self.indices(g)], self.seed, epoch)

    def __len__(self) -> int:  # one epoch; batch numbers beyond it address the later epochs
        return self.per_epoch


def batch_loader(batches: TaskBatches, start: int, stop: int, workers: int, seed: int,
                 pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """Batches ``start .. stop-1`` in order, built (image decoding included) by ``workers`` DataLoader
    processes (0: in this one). The loader draws its workers' base seed from a generator of its own, so it
    leaves the global RNG (dropout) exactly as a run without workers has it."""
    return torch.utils.data.DataLoader(
        batches, batch_size=None, sampler=range(start, stop), num_workers=workers,
        generator=torch.Generator().manual_seed(seed), pin_memory=pin_memory,
        prefetch_factor=2 if workers else None, persistent_workers=False)


def _collator(cfg: FinetuneConfig, model: torch.nn.Module) -> TaskCollator:
    return TaskCollator(TaskDataConfig(max_image_side=cfg.image_size,
                                       pad_multiple=model.config.encoder.total_stride,
                                       max_text_len=cfg.max_text_len))


def _device(batch: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    out = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    if out["pixel_values"].is_floating_point():  # uint8: the encoder normalises it in its own dtype
        out["pixel_values"] = out["pixel_values"].to(dtype)
    return out


def finetune_worker(cfg: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune on this rank (process group from the caller, the environment, or a 1-process gloo one),
    resuming from the run's newest committed checkpoint when there is one."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cfg.scale.use_gpu else "cpu")
    created = ensure_process_group(cfg.scale.use_gpu)
    try:
        return _finetune(cfg)
    finally:
        if created:
            destroy_process_group()


# Options a relaunch may change without changing what the remaining steps compute (besides these, a
# resumed run must have the options its checkpoint was written with).
RESUMABLE_CHANGES = frozenset({
    "max_steps", "epochs", "checkpoint_every", "keep_checkpoints", "loader_workers", "progress", "log_every",
    "eval_batch_size", "eval_limit", "retrieval_k", "retrieval_exhaustive", "skip_eval", "predict_split",
    "predict_file", "tensorboard_dir", "output", "storage_path", "run_name", "s3_endpoint_url", "data",
    "train_file", "eval_file", "train_annotations", "eval_annotations", "image_dir", "checkpoint",
    "eval_split", "launcher", "ray_address", "cpus_per_worker", "use_gpu", "num_workers", "max_failures",
})


def check_resumable(cfg: FinetuneConfig, state: dict[str, Any], world: int, per_epoch: int,
                    source: str) -> None:
    """Refuse, naming the difference, a checkpoint this run cannot continue exactly."""
    if state.get("task") != cfg.task or "batches_per_epoch" not in state:
        what = f"a {state['task']!r} fine-tuning" if state.get("task") else "not a fine-tuning"
        raise RuntimeError(
            f"{source}: {what} checkpoint, this is --task {cfg.task} (run {cfg.name!r} under "
            f"{cfg.checkpoint_root}): give another --run-name or --storage-path")
    if int(state["world_size"]) != world:
        raise RuntimeError(
            f"{source}: written by {state['world_size']} workers, this run has {world}; fine-tuning resumes "
            "on the same number of workers (the batch order and ZeRO partitions depend on it)")
    saved = state.get("config", {})
    now = configcli.to_flat(cfg)
    changed = sorted(k for k in now if k not in RESUMABLE_CHANGES and k in saved and saved[k] != now[k])
    if changed:
        diff = ", ".join(f"{k}: {saved[k]!r} → {now[k]!r}" for k in changed[:6])
        raise RuntimeError(
            f"{source}: run {cfg.name!r} was started with other options ({diff}); relaunch with the same "
            "options to resume it, or give a new --run-name (or --output) to start another run")
    if int(state["batches_per_epoch"]) != per_epoch:
        raise RuntimeError(
            f"{source}: the training data gave {state['batches_per_epoch']} batches per epoch, now it gives "
            f"{per_epoch}: not the data the run was started on")


class _Checkpoints:
    """The run's committed checkpoints (:class:`orchestration.runtime.checkpoint.StorageStore`, the same
    layout, commit and verification as pre-training): ``{storage}/{run}/checkpoints/checkpoint_step_N/`` and
    the per-step history in ``{storage}/{run}/history/``."""

    def __init__(self, cfg: FinetuneConfig, rank: int, world: int, device: torch.device) -> None:
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        root, opts = cfg.checkpoint_root, cfg.storage_options()
        self.store = StorageStore(root, cfg.name, cfg.keep_checkpoints, rank=rank, world_size=world,
                                  storage_options=opts, barrier=dist.barrier if world > 1 else None)
        self.history = HistoryLog.for_run(root, cfg.name, opts)
        self.saved = 0  # records of the attempt's history already in the history log

    def latest(self) -> LocalCheckpoint | None:
        assert self.store.staging is not None
        self.store.staging.remove_stale()  # what a killed attempt of this rank left in the temp dir
        ckpt = self.store.latest(agree=lambda ok: all_agree(ok, self.device))
        if self.rank == 0:
            self.history.truncate_after(int(ckpt.state["step"]) if ckpt else 0)  # never-committed steps
        return ckpt

    def save(self, built: Any, step: int, state: dict[str, Any], history: list[dict[str, Any]]) -> None:
        assert self.store.staging is not None
        t0 = time.perf_counter()
        local = self.store.staging.new(f"ckpt-{step}")
        try:
            save_engine_state(built, local, self.rank)
            codebook = tensor_sha256(visual_dictionary(built.engine).codebook)
            record = {"step": step, "rng": rng_state(), "vd_codebook_sha256": codebook}

            def history_segment() -> None:
                if self.rank == 0:
                    self.history.append(history[self.saved:])

            last = history[-1] if history else {}
            commit_checkpoint(self.store, local, step, rank=self.rank, world_size=self.world,
                              train_state={**state, "vd_codebook_sha256": codebook, "time": time.time()},
                              rank_record=record, before_upload=history_segment,
                              metrics={"step": step, "loss": last.get("loss", float("nan"))})
        finally:
            shutil.rmtree(local, ignore_errors=True)
        self.saved = len(history)
        if self.rank == 0:
            logger.info("checkpoint at step %d committed to %s in %.1f s", step, self.store.describe(),
                        time.perf_counter() - t0)


def _finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = torch.device(f"cuda:{local_rank}" if cfg.scale.use_gpu else "cpu")
    task = TASKS[cfg.task]
    t_start = time.perf_counter()

    checkpoints = _Checkpoints(cfg, rank, world, device) if cfg.checkpoint_every else None
    ckpt = checkpoints.latest() if checkpoints else None
    state = ckpt.state if ckpt else {}
    train = task.read(cfg, "train")
    vocab = None
    if task.needs_vocab:
        if state.get("answer_vocab"):  # the head's classes are the vocabulary the run started with
            vocab = AnswerVocab(state["answer_vocab"])
        else:
            vocab = AnswerVocab.build((e.answers for e in train), cfg.vqa_min_answer_count,
                                      cfg.vqa_max_answers)
    per_epoch = TaskBatches.batches_per_epoch(len(train), cfg.scale.micro_batch_size, world, cfg.task)
    if ckpt is not None:  # before anything is built: a refusal is cheap
        try:
            check_resumable(cfg, state, world, per_epoch, ckpt.source)
        except RuntimeError:
            ckpt.cleanup()
            raise
    model = build_task_model(cfg, vocab)
    logger.info("%s: %s", cfg.task,
                f"backbone from {cfg.init}" if cfg.init else f"from scratch (preset {cfg.preset})")
    collator = _collator(cfg, model)
    if world > 1:
        model.soho.visual_dictionary.reduce_fn = sum_over_ranks
    built = build_engine(model, cfg.optim, cfg.scale, world, kind=cfg.engine, device=device)
    autocast = cfg.scale.precision == "bf16" and cfg.engine == "torch"
    dtype = built.dtype
    batches = TaskBatches(cfg, task, train, collator, rank, world)
    horizon, stop = cfg.planned_steps(batches.per_epoch)
    schedule = dataclasses.replace(cfg.optim, max_steps=horizon)  # the lr schedule spans the planned run

    step, history = 0, []
    if ckpt is not None:
        try:
            load_engine_state(built, ckpt)
            record = read_rank_record(ckpt.path, rank)
            set_rng_state(record["rng"])
            if tensor_sha256(visual_dictionary(built.engine).codebook) != record["vd_codebook_sha256"]:
                raise RuntimeError(
                    f"{ckpt.source}: visual dictionary differs from the checksum saved with it")
            step = int(state["step"])
            assert checkpoints is not None
            history = checkpoints.history.read(upto=step)
            checkpoints.saved = len(history)
            epoch, within = batches.position(step)
            if rank == 0:
                logger.info("%s: resumed from %s at step %d (epoch %d, batch %d of %d)", cfg.task,
                            ckpt.source, step, epoch, within, batches.per_epoch)
        finally:
            ckpt.cleanup()
    start_step = step

    tb = RunLogger(run_name=f"{Path(cfg.output).name}-{cfg.task}", rank=rank,
                   tensorboard_dir=cfg.tensorboard_dir, start_step=start_step)
    bar = tqdm(total=stop, initial=start_step, desc=f"finetune {cfg.task}", leave=False) if (
        rank == 0 and cfg.progress and stop > start_step) else None
    built.module.train()
    data = iter(batch_loader(batches, start_step, stop, cfg.loader_workers, cfg.seed, cfg.scale.use_gpu))
    while step < stop:
        lr = apply_lr(built.optimizer, built.group_specs, schedule, step, False)
        batch = _device(next(data), device, dtype)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss, stats = task.loss(built.engine, batch, vocab, step_generator(cfg.seed, step, rank))
        built.backward_step(loss, cfg.optim.grad_clip)
        epoch = batches.position(step)[0]
        step += 1
        history.append({"step": step, "epoch": epoch, **stats})
        tb.log_scalars(step, {**{f"finetune/{k}": float(v) for k, v in stats.items()}, "finetune/lr": lr})
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{stats['loss']:.3f}")
        if rank == 0 and step % max(1, cfg.log_every) == 0:
            logger.info("%s step %d/%d (epoch %d): %s", cfg.task, step, stop, epoch,
                        " ".join(f"{k}={v:.4f}" for k, v in stats.items()))
        if checkpoints is not None and (step % cfg.checkpoint_every == 0 or step == stop):
            tb.flush()
            epoch_now, within = batches.position(step)
            checkpoints.save(built, step, {
                "step": step, "epoch": epoch_now, "batch_in_epoch": within,
                "batches_per_epoch": batches.per_epoch, "planned_steps": horizon, "task": cfg.task,
                "answer_vocab": vocab.answers if vocab is not None else None,
                "seeds": {"seed": cfg.seed, "batches": "TaskBatches(seed, step, rank, world)",
                          "negatives": "step_generator(seed, step, rank)"},
                "config": configcli.to_flat(cfg), "history_log": "history/ beside the checkpoints",
            }, history)
    del data
    if bar is not None:
        bar.close()
    t_train = time.perf_counter() - t_start

    results: dict[str, Any] = {
        "task": cfg.task, "init": cfg.init, "world_size": world, "steps": step, "start_step": start_step,
        "resumed_from": start_step if ckpt is not None else None, "planned_steps": horizon,
        "batches_per_epoch": batches.per_epoch, "epochs": step / batches.per_epoch,
        "train_examples": len(train), "train_seconds": t_train, "history": history,
        "checkpoints": (f"{checkpoints.store.describe()}" if checkpoints else None),
        "config": configcli.to_flat(cfg)}
    if rank == 0:
        out = Path(cfg.output)
        bare = unwrap(built.engine)
        bare.save_pretrained(out / "model")
        if vocab is not None:
            vocab.save(out / "model" / ANSWERS_NAME)
        _evaluate_and_predict(cfg, task, bare, collator, vocab, device, dtype, results, tb, step)
        tb.close()
        results["model_dir"] = str(out / "model")
        (out / RESULTS_NAME).write_text(json.dumps(results, indent=1, default=str) + "\n")
    if world > 1:
        dist.barrier()
    return results


def _evaluate_and_predict(cfg: FinetuneConfig, task: Task, model: torch.nn.Module, collator: TaskCollator,
                          vocab: AnswerVocab | None, device: torch.device, dtype: torch.dtype,
                          results: dict[str, Any], tb: RunLogger | None = None, step: int = 0) -> None:
    """The eval split's figures into ``results["eval"]`` (unless ``--skip-eval``), and the answers of the
    unlabelled ``--predict-split`` into ``{output}/vqa_<split>_results.json``."""
    if not cfg.skip_eval:
        t0 = time.perf_counter()
        examples = task.read(cfg, "eval")
        if cfg.eval_limit is not None:
            examples = examples[: cfg.eval_limit]
        results["eval"] = task.evaluate(cfg, model, collator, examples, vocab, device, dtype)
        results["eval_seconds"] = time.perf_counter() - t0
        logger.info("%s eval: %s", cfg.task, dict(results["eval"].items()))
        if tb is not None:
            tb.log_scalars(step, {f"finetune_eval/{k}": float(v) for k, v in results["eval"].items()
                                  if isinstance(v, (int, float)) and k != "num_examples"})
    if cfg.predict_split is not None:
        assert vocab is not None  # validated: VQA only
        t0 = time.perf_counter()
        questions = task.read(cfg, "predict")
        answers = predict_vqa(model, collator, questions, vocab, cfg.eval_batch_size, device, dtype,
                              cfg.progress)
        path = Path(cfg.output) / PREDICTIONS_NAME.format(split=cfg.predict_split)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(vqa_result_file(questions, answers)) + "\n")
        results["predictions"] = {"split": cfg.predict_split, "file": str(path), "questions": len(questions),
                                  "seconds": time.perf_counter() - t0}
        logger.info("%s: answers to %d questions of %s written to %s", cfg.task, len(questions),
                    cfg.predict_split, path)


def evaluate_checkpoint(cfg: FinetuneConfig) -> dict[str, Any]:
    """Evaluate a fine-tuned model directory (``--checkpoint``) on the task's eval split (one process)."""
    if not cfg.checkpoint:
        raise ValueError("--checkpoint (a fine-tuned model directory) is required")
    device = torch.device("cuda" if cfg.scale.use_gpu else "cpu")
    dtype = torch.bfloat16 if cfg.scale.precision == "bf16" else torch.float32
    model = load_task_model(cfg.checkpoint)
    if model.task != cfg.task:
        raise ValueError(f"--checkpoint {cfg.checkpoint} is a {model.task!r} model, not --task {cfg.task!r}")
    task = TASKS[cfg.task]
    vocab = AnswerVocab.load(Path(cfg.checkpoint) / ANSWERS_NAME) if task.needs_vocab else None
    model = model.to(device)
    results: dict[str, Any] = {"task": cfg.task, "checkpoint": cfg.checkpoint}
    _evaluate_and_predict(cfg, task, model, _collator(cfg, model), vocab, device, dtype, results)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS_NAME).write_text(json.dumps(results, indent=1, default=str) + "\n")
    return results
