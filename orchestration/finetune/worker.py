"""The fine-tuning worker: one rank's training loop for any task of
:data:`orchestration.finetune.tasks.TASKS`.

Ray-free like the pre-training loop: it runs on an existing ``torch.distributed`` process group (Ray Train's,
torchrun's) or makes a one-process gloo group (:mod:`orchestration.runtime.distributed`), builds its engine
with :func:`orchestration.runtime.engine.build_engine` (DeepSpeed, or plain torch with ``--engine torch``:
DDP when world > 1), sets the learning rate per step with :mod:`orchestration.runtime.schedule`, and sums
the visual dictionary's statistics over ranks. Rank 0 evaluates, saves the task model (``{output}/model``)
and writes ``{output}/results.json``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

import configcli
from data_pipeline.downstream import TaskCollator, TaskDataConfig
from orchestration.finetune.config import FinetuneConfig
from orchestration.finetune.tasks import TASKS, Task, build_task_model
from orchestration.runtime.distributed import (
    destroy_process_group,
    ensure_process_group,
    step_generator,
    sum_over_ranks,
    unwrap,
)
from orchestration.runtime.engine import build_engine
from orchestration.runtime.loggers import RunLogger
from orchestration.runtime.schedule import apply_lr
from soho.downstream.modeling import load_task_model
from soho.downstream.vqa import AnswerVocab

logger = logging.getLogger(__name__)

RESULTS_NAME = "results.json"
ANSWERS_NAME = "answers.json"


class TaskBatches:
    """Endless, per-rank batches: each epoch shuffles the examples by (seed, epoch), then rank r takes every
    world-th one, so ranks see disjoint data of equal count."""

    def __init__(self, cfg: FinetuneConfig, task: Task, examples: list[Any], collator: TaskCollator,
                 rank: int, world: int) -> None:
        batch = cfg.scale.micro_batch_size
        if len(examples) < batch * world:
            raise ValueError(
                f"{cfg.task}: {len(examples)} training examples < micro batch {batch} × {world} workers")
        self.cfg, self.task, self.examples, self.collator = cfg, task, examples, collator
        self.rank, self.world, self.epoch = rank, world, 0

    def __iter__(self) -> Any:
        size = self.cfg.scale.micro_batch_size
        while True:
            order = list(range(len(self.examples)))
            random.Random(f"{self.cfg.seed}/finetune/{self.epoch}").shuffle(order)
            mine = order[self.rank :: self.world]
            for start in range(0, len(mine) - size + 1, size):
                chunk = [self.examples[i] for i in mine[start : start + size]]
                yield self.task.collate(self.collator, chunk, self.cfg.seed, self.epoch)
            self.epoch += 1


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
    """Fine-tune on this rank (process group from the caller, the environment, or a 1-process gloo one)."""
    created = ensure_process_group(cfg.scale.use_gpu)
    try:
        return _finetune(cfg)
    finally:
        if created:
            destroy_process_group()


def _finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = torch.device(f"cuda:{local_rank}" if cfg.scale.use_gpu else "cpu")
    task = TASKS[cfg.task]
    t_start = time.perf_counter()

    train = task.read(cfg, "train")
    vocab = None
    if task.needs_vocab:
        vocab = AnswerVocab.build((e.answers for e in train), cfg.vqa_min_answer_count, cfg.vqa_max_answers)
    model = build_task_model(cfg, vocab)
    logger.info("%s: %s", cfg.task,
                f"backbone from {cfg.init}" if cfg.init else f"from scratch (preset {cfg.preset})")
    collator = _collator(cfg, model)
    if world > 1:
        model.soho.visual_dictionary.reduce_fn = sum_over_ranks
    built = build_engine(model, cfg.optim, cfg.scale, world, kind=cfg.engine, device=device)
    autocast = cfg.scale.precision == "bf16" and cfg.engine == "torch"
    dtype = built.dtype

    history: list[dict[str, float]] = []
    tb = RunLogger(run_name=f"{Path(cfg.output).name}-{cfg.task}", rank=rank,
                   tensorboard_dir=cfg.tensorboard_dir)
    batches = iter(TaskBatches(cfg, task, train, collator, rank, world))
    max_steps = cfg.optim.max_steps
    bar = tqdm(total=max_steps, desc=f"finetune {cfg.task}", leave=False) if (
        rank == 0 and cfg.progress and max_steps) else None
    built.module.train()
    for step in range(max_steps):
        lr = apply_lr(built.optimizer, built.group_specs, cfg.optim, step, False)
        batch = _device(next(batches), device, dtype)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss, stats = task.loss(built.engine, batch, vocab, step_generator(cfg.seed, step, rank))
        built.backward_step(loss, cfg.optim.grad_clip)
        history.append({"step": step + 1, **stats})
        tb.log_scalars(step + 1, {**{f"finetune/{k}": float(v) for k, v in stats.items()}, "finetune/lr": lr})
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{stats['loss']:.3f}")
        if rank == 0 and (step + 1) % max(1, cfg.log_every) == 0:
            logger.info("%s step %d/%d: %s", cfg.task, step + 1, max_steps,
                        " ".join(f"{k}={v:.4f}" for k, v in stats.items()))
    if bar is not None:
        bar.close()
    t_train = time.perf_counter() - t_start

    results: dict[str, Any] = {"task": cfg.task, "init": cfg.init, "world_size": world, "steps": max_steps,
                               "train_examples": len(train), "train_seconds": t_train, "history": history,
                               "config": configcli.to_flat(cfg)}
    if rank == 0:
        out = Path(cfg.output)
        bare = unwrap(built.engine)
        bare.save_pretrained(out / "model")
        if vocab is not None:
            vocab.save(out / "model" / ANSWERS_NAME)
        if not cfg.skip_eval:
            t0 = time.perf_counter()
            results["eval"] = task.evaluate(cfg, bare, collator, task.read(cfg, "eval"), vocab, device, dtype)
            results["eval_seconds"] = time.perf_counter() - t0
            logger.info("%s eval: %s", cfg.task, dict(results["eval"].items()))
            tb.log_scalars(max_steps, {f"finetune_eval/{k}": float(v) for k, v in results["eval"].items()
                                       if isinstance(v, (int, float)) and k != "num_examples"})
        tb.close()
        results["model_dir"] = str(out / "model")
        (out / RESULTS_NAME).write_text(json.dumps(results, indent=1, default=str) + "\n")
    if world > 1:
        dist.barrier()
    return results


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
    t0 = time.perf_counter()
    results = {"task": cfg.task, "checkpoint": cfg.checkpoint,
               "eval": task.evaluate(cfg, model, _collator(cfg, model), task.read(cfg, "eval"), vocab, device,
                                     dtype),
               "eval_seconds": time.perf_counter() - t0}
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS_NAME).write_text(json.dumps(results, indent=1, default=str) + "\n")
    return results
