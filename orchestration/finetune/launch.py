"""``python -m soho.finetune`` / ``python -m soho.evaluate``: parse the options, find the data, and run the
fine-tuning worker in this process (``--launcher local``: one process, or a torchrun rank) or on Ray Train
(``--launcher ray``: the same worker on ``--num-workers`` workers).

Data: ``--data`` is a downstream root in the synthetic layout (``{data}/vqa/train_questions.json``, …,
``{data}/images``); without it the synthetic files are generated once into the local cache. Real datasets:
``--train-file/--eval-file`` (+ ``--train-annotations/--eval-annotations`` for VQA) and ``--image-dir``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import configcli
from data_pipeline.synth import make_synthetic
from orchestration.finetune.config import FinetuneConfig, parse_config
from orchestration.finetune.worker import RESULTS_NAME, evaluate_checkpoint, finetune_worker
from orchestration.runtime.config import default_cache_dir
from orchestration.runtime.ray_launch import (
    build_torch_trainer,
    configure_logging,
    connect_ray,
    ray_runtime_env,
    shutdown_ray,
    worker_process_setup,
)

_PATH_FIELDS = ("init", "checkpoint", "data", "train_file", "eval_file", "train_annotations", "predict_file",
                "eval_annotations", "image_dir", "output", "tensorboard_dir", "storage_path")


def synthetic_downstream_root(seed: int = 0) -> str:
    """The embedded synthetic downstream files, written once into the local cache."""
    out = default_cache_dir() / f"finetune-synthetic-s{seed}"
    result = make_synthetic(str(out), num=16, seed=seed, heldout=0, image_size=128)
    return str(result["downstream"])


def _ray_entry(config: dict[str, Any]) -> None:
    worker_process_setup()
    finetune_worker(configcli.from_flat(FinetuneConfig, config["finetune_config"],
                                        source="ray train_loop_config"))


def _absolute_paths(cfg: FinetuneConfig) -> FinetuneConfig:
    """Local paths resolved against the driver's directory: Ray Train workers run in their own directory."""
    changes = {name: os.path.abspath(value) for name in _PATH_FIELDS
               if (value := getattr(cfg, name)) and "://" not in value}
    return dataclasses.replace(cfg, **changes)


def launch_ray(cfg: FinetuneConfig) -> dict[str, Any]:
    """The same worker on Ray Train (gloo on CPU, NCCL on GPU); returns rank 0's results.json. Ray is joined
    or started as pre-training does (:func:`orchestration.runtime.ray_launch.connect_ray`)."""
    scale = cfg.scale
    started, _ = connect_ray(scale.ray_address, scale.num_workers * scale.cpus_per_worker,
                             ray_runtime_env(scale.use_gpu))
    cfg = dataclasses.replace(_absolute_paths(cfg), progress=False)
    # Checkpoints go through the StorageStore (--storage-path, default --output: every worker must reach
    # it); Ray's own storage only holds its run records. A restarted worker group resumes by itself.
    trainer = build_torch_trainer(_ray_entry, {"finetune_config": configcli.to_flat(cfg)}, scale,
                                  name=f"finetune-{cfg.task}", storage_path=os.path.join(cfg.output, "ray"),
                                  max_failures=cfg.max_failures if cfg.checkpoint_every else 0)
    try:
        trainer.fit()
        return json.loads((Path(cfg.output) / RESULTS_NAME).read_text())
    finally:
        if started:
            shutdown_ray()


def _parse(argv: list[str] | None, prog: str) -> FinetuneConfig:
    cfg = parse_config(argv, prog, __doc__ or "")
    if cfg.data is None and cfg.train_file is None and cfg.eval_file is None:
        cfg = dataclasses.replace(cfg, data=synthetic_downstream_root(cfg.seed))
    return cfg


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``python -m soho.finetune``: fine-tune, evaluate, write {output}/results.json; returns it."""
    configure_logging()
    cfg = _parse(argv, "python -m soho.finetune")
    results = launch_ray(cfg) if cfg.scale.launcher == "ray" else finetune_worker(cfg)
    if results.get("eval") is not None:
        print(json.dumps({"task": cfg.task, "eval": results["eval"]}, indent=1))
    return results


def evaluate_main(argv: list[str] | None = None) -> dict[str, Any]:
    """``python -m soho.evaluate --task T --checkpoint DIR``: evaluate a fine-tuned model."""
    configure_logging()
    cfg = _parse(argv, "python -m soho.evaluate")
    results = evaluate_checkpoint(cfg)
    print(json.dumps(results["eval"], indent=1))
    return results
