"""Launchers around the Ray-free worker loop.

* :func:`launch_ray` — Ray Train ``TorchTrainer``: N workers (gloo on CPU, NCCL on GPU), ``FailureConfig``
  restarts the worker group from the latest committed checkpoint, Ray persists checkpoints to
  ``storage_path`` (local or ``s3://``) and keeps the newest ``keep_checkpoints``. Relaunching with the same
  ``--run-name`` and ``--storage-path`` resumes.
* :func:`launch_local` — this process is one rank: a plain single process, or one rank of ``torchrun`` /
  the deepspeed launcher (process group from the environment); checkpoints go through
  :class:`~orchestration.runtime.checkpoint.StorageStore`.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
import time
import urllib.parse
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch.distributed as dist

from data_pipeline.synth import SynthConfig, make_synthetic
from orchestration.pretrain import data_eval
from orchestration.pretrain.config import RunConfig
from orchestration.pretrain.heldout_eval import HeldoutConfig, evaluate_export, prepare_heldout
from orchestration.pretrain.summary import write_run_artifacts
from orchestration.pretrain.worker import train_loop
from orchestration.runtime.checkpoint import EXPORT_DIR, TRAIN_STATE, RayStore, StorageStore, verify_local
from orchestration.runtime.config import synthetic_data_dir
from orchestration.runtime.distributed import destroy_process_group, ensure_process_group
from orchestration.runtime.ray_launch import (
    build_torch_trainer,
    configure_logging,
    connect_ray,
    ray_runtime_env,
    shutdown_ray,
    worker_process_setup,
)
from soho import SohoForPretraining

logger = logging.getLogger(__name__)

SYNTHETIC_IMAGE_SIZE = 128


def ensure_data(cfg: RunConfig) -> str:
    """The shard URL the workers read: ``--data`` as given, or the embedded synthetic data, generated once
    into the local cache (a file lock keeps concurrent first runs from writing it twice)."""
    if cfg.dataset.data:
        return cfg.dataset.data
    # The same pre-training pairs plus the held-out split (unless --eval-data replaces it): made once.
    if cfg.observability.eval_data is None and (cfg.run_final_eval or cfg.observability.eval_every):
        t0 = time.perf_counter()
        _, manifest = prepare_heldout(
            HeldoutConfig.from_run_config(cfg, num_candidates=cfg.observability.eval_candidates))
        logger.info("synthetic data with %d held-out scenes ready (%.1f s)",
                    cfg.observability.eval_candidates, time.perf_counter() - t0)
        return manifest
    out = synthetic_data_dir(cfg.dataset.synthetic_pairs, cfg.seed, captions=cfg.dataset.synthetic_captions)
    out.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        t0 = time.perf_counter()
        result = make_synthetic(str(out), num=cfg.dataset.synthetic_pairs, seed=cfg.seed, heldout=0,
                                image_size=SYNTHETIC_IMAGE_SIZE,
                                config=SynthConfig(captions_per_scene=cfg.dataset.synthetic_captions))
        logger.info("synthetic data ready in %s (%.1f s)", out, time.perf_counter() - t0)
    return str(result.get("pretrain_manifest") or out / "pretrain" / "manifest.json")


def final_heldout_eval(cfg: RunConfig, export: Path) -> dict[str, Any] | None:
    """``--final-eval``: the held-out figures of the exported final model (None when off), on --eval-data
    when given, else on the synthetic held-out split."""
    if not cfg.run_final_eval:
        return None
    if not export.is_dir():
        raise RuntimeError(f"--final-eval: the final checkpoint has no exported model at {export}")
    if cfg.observability.eval_data is not None:
        figures = data_eval.evaluate_model(SohoForPretraining.from_pretrained(str(export)), cfg)
        logger.info("evaluation of the final model on %s %s: ITM acc %.3f, R@1 t2i %.1f %% / i2t %.1f %% "
                    "among %d images (%s, %.1f s)", cfg.observability.eval_data, cfg.observability.eval_split,
                    figures["itm_acc"], figures["t2i_r1"], figures["i2t_r1"], figures["num_candidates"],
                    figures["mode"], figures["eval_seconds"])
        return figures
    result = evaluate_export(
        export, HeldoutConfig.from_run_config(cfg, num_candidates=cfg.observability.eval_candidates))
    logger.info("held-out evaluation of the final model: ITM acc %.3f, R@1 t2i %.0f %% / i2t %.0f %% among "
                "%d (paraphrased captions: ITM acc %.3f, R@1 t2i %.0f %% / i2t %.0f %%), VD usage %.2f "
                "perplexity %.1f (%.1f s)", result["itm_acc"], result["t2i_r1"], result["i2t_r1"],
                result["num_candidates"], result["para_itm_acc"], result["para_t2i_r1"],
                result["para_i2t_r1"], result["vd_usage_ratio"], result["vd_perplexity"],
                result["eval_seconds"])
    return result


# --- local (no Ray) ---------------------------------------------------------------------------------
def launch_local(cfg: RunConfig, data_url: str | None = None) -> dict[str, Any]:
    """Train in this process (one rank of torchrun when WORLD_SIZE is set). Rank 0 writes the summary."""
    configure_logging()
    check_run_paths(cfg)
    t0 = time.perf_counter()
    data_url = data_url or ensure_data(cfg)
    created = ensure_process_group(cfg.scale.use_gpu)
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        store = StorageStore(cfg.checkpoint.storage_path, cfg.name, cfg.checkpoint.keep_checkpoints,
                             rank=rank, world_size=world, storage_options=cfg.storage_options(),
                             barrier=dist.barrier)
        result = train_loop(cfg, store, data_url)
        summary: dict[str, Any] = {"worker": asdict(result)}
        if rank == 0:
            latest = store.latest()
            if latest is None:
                raise RuntimeError(f"run finished but no committed checkpoint in {store.describe()}")
            try:
                export = latest.path / EXPORT_DIR
                heldout = final_heldout_eval(cfg, export)
                summary.update(write_run_artifacts(
                    latest.state, str(export) if export.is_dir() else None, cfg.checkpoint.storage_path,
                    cfg.name, cfg.storage_options(), time.perf_counter() - t0, heldout=heldout))
                summary["checkpoint"] = latest.source
            finally:
                latest.cleanup()
        dist.barrier()
        return summary
    finally:
        if created:
            destroy_process_group()


# --- Ray Train --------------------------------------------------------------------------------------
def _ray_worker(config: dict[str, Any]) -> None:
    """Body of each Ray Train worker: the Ray-free loop with Ray's checkpoint store."""
    import ray.train

    worker_process_setup()
    cfg = RunConfig.from_dict(config["run_config"], source="ray train_loop_config")
    rank = ray.train.get_context().get_world_rank()
    train_loop(cfg, RayStore(rank), config["data_url"], under_ray=True)


def _storage_filesystem(cfg: RunConfig) -> Any:
    """pyarrow filesystem for an s3:// storage path (endpoint from --s3-endpoint-url, e.g. MinIO/moto)."""
    if not cfg.checkpoint.storage_path.startswith("s3://"):
        return None
    import pyarrow.fs
    import s3fs

    fs = s3fs.S3FileSystem(**cfg.storage_options())
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def ray_storage_path(cfg: RunConfig) -> str:
    if cfg.checkpoint.storage_path.startswith("s3://"):
        # with storage_filesystem, Ray wants the bucket/prefix path
        return cfg.checkpoint.storage_path[len("s3://"):]
    if "://" in cfg.checkpoint.storage_path:
        raise ValueError(f"--storage-path {cfg.checkpoint.storage_path!r}: only local paths and s3:// are "
                         "supported with Ray")
    return os.path.abspath(cfg.checkpoint.storage_path)


# `ray job submit --working-dir DIR` runs the entrypoint in Ray's temporary copy of DIR, under
# <session>/runtime_resources/working_dir_files/_ray_pkg_<hash>/.
_RAY_WORKING_DIR_COPY = os.sep + os.path.join("runtime_resources", "working_dir_files") + os.sep


def in_ray_working_dir_copy(cwd: str | None = None) -> bool:
    """True when ``cwd`` (default: this process's) lies inside Ray's per-job copy of a working dir."""
    return _RAY_WORKING_DIR_COPY in os.path.realpath(cwd or os.getcwd()) + os.sep


def check_run_paths(cfg: RunConfig, cwd: str | None = None) -> None:
    """Refuse what would put a run where it cannot be found or would leak a secret.

    * A relative ``--storage-path`` inside a ``ray job submit --working-dir`` copy: it would resolve inside
      Ray's temporary copy of the tree, which Ray garbage-collects, and a relaunch from a changed tree gets
      another copy and cannot resume. There is no stable root to resolve it against that would be right on
      every cluster (the submitting machine's folder is not on the cluster; a node-local folder is not shared
      between nodes), so the user names the place: an absolute path or ``s3://``.
    * A URL with a password in it (``https://user:secret@host``): it would be logged, stored in every
      ``train_state.json`` and shown in Ray's job info. Credentials come from the environment.
    """
    path = cfg.checkpoint.storage_path
    if "://" not in path and not os.path.isabs(path) and in_ray_working_dir_copy(cwd):
        raise ValueError(
            f"--storage-path {path!r} is relative and this job runs in Ray's temporary copy of its working "
            f"dir ({os.path.realpath(cwd or os.getcwd())}): checkpoints, export and summary would land "
            "where Ray deletes them, and a relaunch could not resume. Pass an absolute path that every node "
            "reaches (on a one-machine `ray start` cluster: --storage-path \"$PWD/runs\", expanded by your "
            "shell) or s3://bucket/prefix, or set SOHO_STORAGE_PATH to one in the cluster's environment.")
    for name in ("storage_path", "data", "s3_endpoint_url", "tensorboard_dir"):
        value = cfg.to_dict()[name]
        if value and "://" in value:
            try:
                password = urllib.parse.urlsplit(value).password
            except ValueError:
                password = None
            if password:
                raise ValueError(
                    f"--{name.replace('_', '-')} carries a password in its URL; it would be logged and "
                    "saved with every checkpoint. Give credentials through the environment "
                    "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN) or a credentials file "
                    "(AWS_SHARED_CREDENTIALS_FILE, AWS_PROFILE).")


def launch_ray(cfg: RunConfig, data_url: str | None = None) -> dict[str, Any]:
    """Run the job on Ray Train; returns the run summary (also written to storage)."""
    configure_logging()
    check_run_paths(cfg)
    t0 = time.perf_counter()
    data_url = data_url or ensure_data(cfg)
    if not cfg.dataset.data and not os.path.isabs(data_url) and "://" not in data_url:
        data_url = os.path.abspath(data_url)
    paths = cfg.to_dict()
    local = {name: os.path.abspath(os.path.expanduser(paths[name]))
             for name in ("tensorboard_dir", "init_from", "eval_data", "eval_images")
             if paths[name] and "://" not in paths[name]}
    if local:  # Ray workers run in a directory of their own
        cfg = cfg.replace(**local)
    scale = cfg.scale
    started_ray, joined = connect_ray(scale.ray_address, scale.num_workers * scale.cpus_per_worker,
                                      ray_runtime_env(scale.use_gpu))
    if started_ray and joined and "s3://" in f"{cfg.checkpoint.storage_path} {cfg.dataset.data or ''}":
        logger.info("joined an existing Ray cluster: its workers use the S3 credentials of their own "
                    "environment (AWS_* or a credentials file where the nodes were started); none are sent")
    try:
        trainer = build_torch_trainer(
            _ray_worker, {"run_config": cfg.to_dict(), "data_url": data_url}, scale, name=cfg.name,
            storage_path=ray_storage_path(cfg), storage_filesystem=_storage_filesystem(cfg),
            max_failures=cfg.faults.max_failures, keep_checkpoints=cfg.checkpoint.keep_checkpoints,
            elastic=True)  # a checkpoint resumes on any worker count (orchestration/runtime/reshard.py)
        result = trainer.fit()
        if result.error is not None:
            raise result.error
        if result.checkpoint is None:
            raise RuntimeError(f"run {cfg.name} finished without a checkpoint")
        local = Path(tempfile.mkdtemp(prefix="soho-final-"))
        try:
            result.checkpoint.to_directory(str(local))
            if started_ray:
                shutdown_ray()  # the run is over: free the cores (and the driver) for the held-out evaluation
            state = verify_local(local)
            export = local / EXPORT_DIR
            heldout = final_heldout_eval(cfg, export)
            summary = write_run_artifacts(state, str(export) if export.is_dir() else None,
                                          cfg.checkpoint.storage_path, cfg.name, cfg.storage_options(),
                                          time.perf_counter() - t0, heldout=heldout)
            summary["checkpoint"] = result.checkpoint.path
            summary["train_state"] = TRAIN_STATE
        finally:
            shutil.rmtree(local, ignore_errors=True)
        return summary
    finally:
        if started_ray:
            shutdown_ray()
