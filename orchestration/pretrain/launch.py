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
import re
import shutil
import tempfile
import time
import urllib.parse
from dataclasses import asdict
from pathlib import Path
from typing import Any

from orchestration.runtime.checkpoint import EXPORT_DIR, TRAIN_STATE, StorageStore, verify_local
from orchestration.pretrain.config import SYNTHETIC_CACHE_VERSION, RunConfig, default_cache_dir
from orchestration.pretrain.summary import write_run_artifacts

logger = logging.getLogger(__name__)

SYNTHETIC_IMAGE_SIZE = 128


def ensure_data(cfg: RunConfig) -> str:
    """The shard URL the workers read: ``--data`` as given, or the embedded synthetic data, generated once
    into the local cache (a file lock keeps concurrent first runs from writing it twice)."""
    if cfg.data:
        return cfg.data
    if cfg.run_final_eval or cfg.eval_every:  # the same pre-training pairs plus the held-out split: made once
        from orchestration.pretrain.heldout_eval import HeldoutConfig, prepare_heldout

        t0 = time.perf_counter()
        _, manifest = prepare_heldout(HeldoutConfig.from_run_config(cfg, num_candidates=cfg.eval_candidates))
        logger.info("synthetic data with %d held-out scenes ready (%.1f s)", cfg.eval_candidates,
                    time.perf_counter() - t0)
        return manifest
    from data_pipeline.synth import make_synthetic

    out = default_cache_dir() / f"synthetic-v{SYNTHETIC_CACHE_VERSION}-n{cfg.synthetic_pairs}-s{cfg.seed}"
    out.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        t0 = time.perf_counter()
        result = make_synthetic(str(out), num=cfg.synthetic_pairs, seed=cfg.seed, heldout=0,
                                image_size=SYNTHETIC_IMAGE_SIZE)
        logger.info("synthetic data ready in %s (%.1f s)", out, time.perf_counter() - t0)
    return str(result.get("pretrain_manifest") or out / "pretrain" / "manifest.json")


def final_heldout_eval(cfg: RunConfig, export: Path) -> dict[str, Any] | None:
    """``--final-eval``: the held-out figures of the exported final model (None when off)."""
    if not cfg.run_final_eval:
        return None
    if not export.is_dir():
        raise RuntimeError(f"--final-eval: the final checkpoint has no exported model at {export}")
    from orchestration.pretrain.heldout_eval import HeldoutConfig, evaluate_export

    result = evaluate_export(export, HeldoutConfig.from_run_config(cfg, num_candidates=cfg.eval_candidates))
    logger.info("held-out evaluation of the final model: ITM acc %.3f, R@1 t2i %.0f %% / i2t %.0f %% among %d, "
                "VD usage %.2f perplexity %.1f (%.1f s)", result["itm_acc"], result["t2i_r1"], result["i2t_r1"],
                result["num_candidates"], result["vd_usage_ratio"], result["vd_perplexity"], result["eval_seconds"])
    return result


def _configure_logging() -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# --- local (no Ray) ---------------------------------------------------------------------------------
def launch_local(cfg: RunConfig, data_url: str | None = None) -> dict[str, Any]:
    """Train in this process (one rank of torchrun when WORLD_SIZE is set). Rank 0 writes the summary."""
    import torch.distributed as dist

    from orchestration.pretrain.worker import destroy_process_group, ensure_process_group, train_loop

    _configure_logging()
    check_run_paths(cfg)
    t0 = time.perf_counter()
    data_url = data_url or ensure_data(cfg)
    created = ensure_process_group(cfg.use_gpu)
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        store = StorageStore(cfg.storage_path, cfg.name, cfg.keep_checkpoints, rank=rank, world_size=world,
                             storage_options=cfg.storage_options(), barrier=dist.barrier)
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
                    latest.state, str(export) if export.is_dir() else None, cfg.storage_path, cfg.name,
                    cfg.storage_options(), time.perf_counter() - t0, heldout=heldout))
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

    from orchestration.runtime.checkpoint import RayStore
    from orchestration.pretrain.worker import train_loop

    _configure_logging()
    # Ray starts worker processes at niceness 15 (meant for its helpers); a training worker is the node's
    # main work and must not be starved by ordinary processes. Lowering needs CAP_SYS_NICE: best effort.
    try:
        os.setpriority(os.PRIO_PROCESS, 0, 0)
    except OSError:
        pass
    cfg = RunConfig.from_dict(config["run_config"], source="ray train_loop_config")
    rank = ray.train.get_context().get_world_rank()
    train_loop(cfg, RayStore(rank), config["data_url"], under_ray=True)


def _storage_filesystem(cfg: RunConfig) -> Any:
    """pyarrow filesystem for an s3:// storage path (endpoint from --s3-endpoint-url, e.g. MinIO/moto)."""
    if not cfg.storage_path.startswith("s3://"):
        return None
    import pyarrow.fs
    import s3fs

    fs = s3fs.S3FileSystem(**cfg.storage_options())
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def ray_storage_path(cfg: RunConfig) -> str:
    if cfg.storage_path.startswith("s3://"):
        return cfg.storage_path[len("s3://"):]  # with storage_filesystem, Ray wants the bucket/prefix path
    if "://" in cfg.storage_path:
        raise ValueError(f"--storage-path {cfg.storage_path!r}: only local paths and s3:// are supported with Ray")
    return os.path.abspath(cfg.storage_path)


# Settings a Ray worker needs that a `ray start` node may lack. Never credentials: Ray shows a runtime_env in
# its job info, dashboard and logs. Workers read AWS_* (incl. AWS_SESSION_TOKEN) or a credentials file from the
# environment they already have: a local Ray started by this driver inherits the driver's environment, the
# nodes of a `ray start` / KubeRay cluster have their own (on Kubernetes: the soho-s3-credentials Secret).
RUNTIME_ENV_VARS = ("SOHO_FAULT_DIR", "SOHO_CACHE_DIR", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "AWS_DEFAULT_REGION")
SECRET_ENV_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|ACCESS_KEY|CREDENTIAL|SESSION|PRIVATE", re.I)


def ray_runtime_env(cfg: RunConfig, environ: dict[str, str] | None = None) -> dict[str, Any]:
    """The runtime_env the driver passes to ``ray.init``: non-secret settings only."""
    environ = os.environ if environ is None else environ
    env_vars = {"DS_ACCELERATOR": "cuda" if cfg.use_gpu else "cpu", "PYTHONUNBUFFERED": "1"}
    env_vars.update({k: environ[k] for k in RUNTIME_ENV_VARS if k in environ})
    leaked = sorted(k for k in env_vars if SECRET_ENV_NAME.search(k))
    if leaked:  # a guard for whoever extends RUNTIME_ENV_VARS
        raise RuntimeError(f"refusing to put {leaked} into Ray's runtime_env: workers read secrets from their env")
    return {"env_vars": env_vars}


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
    path = cfg.storage_path
    if "://" not in path and not os.path.isabs(path) and in_ray_working_dir_copy(cwd):
        raise ValueError(
            f"--storage-path {path!r} is relative and this job runs in Ray's temporary copy of its working dir "
            f"({os.path.realpath(cwd or os.getcwd())}): checkpoints, export and summary would land where Ray "
            "deletes them, and a relaunch could not resume. Pass an absolute path that every node reaches "
            "(on a one-machine `ray start` cluster: --storage-path \"$PWD/runs\", expanded by your shell) or "
            "s3://bucket/prefix, or set SOHO_STORAGE_PATH to one in the cluster's environment.")
    for name in ("storage_path", "data", "s3_endpoint_url", "tensorboard_dir"):
        value = getattr(cfg, name)
        if value and "://" in value:
            try:
                password = urllib.parse.urlsplit(value).password
            except ValueError:
                password = None
            if password:
                raise ValueError(
                    f"--{name.replace('_', '-')} carries a password in its URL; it would be logged and saved with "
                    "every checkpoint. Give credentials through the environment (AWS_ACCESS_KEY_ID, "
                    "AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN) or a credentials file (AWS_SHARED_CREDENTIALS_FILE, "
                    "AWS_PROFILE).")


def launch_ray(cfg: RunConfig, data_url: str | None = None) -> dict[str, Any]:
    """Run the job on Ray Train; returns the run summary (also written to storage)."""
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    _configure_logging()
    check_run_paths(cfg)
    t0 = time.perf_counter()
    data_url = data_url or ensure_data(cfg)
    if not cfg.data and not os.path.isabs(data_url) and "://" not in data_url:
        data_url = os.path.abspath(data_url)
    if cfg.tensorboard_dir and "://" not in cfg.tensorboard_dir:  # Ray workers run in a directory of their own
        cfg = cfg.replace(tensorboard_dir=os.path.abspath(os.path.expanduser(cfg.tensorboard_dir)))
    started_ray = False
    if not ray.is_initialized():
        address = cfg.ray_address or os.environ.get("RAY_ADDRESS")
        init_kwargs: dict[str, Any] = {"runtime_env": ray_runtime_env(cfg), "log_to_driver": True}
        joined = True
        if address:
            ray.init(address=address, **init_kwargs)
        else:
            try:  # a cluster that `ray start` made on this machine
                ray.init(address="auto", **init_kwargs)
            except ConnectionError:
                need = cfg.num_workers * cfg.cpus_per_worker
                ray.init(num_cpus=max(need, os.cpu_count() or 1), include_dashboard=False, **init_kwargs)
                joined = False
        started_ray = True
        if joined and "s3://" in f"{cfg.storage_path} {cfg.data or ''}":
            logger.info("joined an existing Ray cluster: its workers use the S3 credentials of their own "
                        "environment (AWS_* or a credentials file where the nodes were started); none are sent")
    try:
        trainer = TorchTrainer(
            _ray_worker,
            train_loop_config={"run_config": cfg.to_dict(), "data_url": data_url},
            scaling_config=ray.train.ScalingConfig(
                num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})},
            ),
            torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
            run_config=ray.train.RunConfig(
                name=cfg.name,
                storage_path=ray_storage_path(cfg),
                storage_filesystem=_storage_filesystem(cfg),
                failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            ),
        )
        result = trainer.fit()
        if result.error is not None:
            raise result.error
        if result.checkpoint is None:
            raise RuntimeError(f"run {cfg.name} finished without a checkpoint")
        local = Path(tempfile.mkdtemp(prefix="soho-final-"))
        try:
            result.checkpoint.to_directory(str(local))
            if started_ray and os.environ.get("SOHO_KEEP_RAY") != "1":
                ray.shutdown()  # the run is over: free the cores (and the driver) for the held-out evaluation
            state = verify_local(local)
            export = local / EXPORT_DIR
            heldout = final_heldout_eval(cfg, export)
            summary = write_run_artifacts(state, str(export) if export.is_dir() else None, cfg.storage_path,
                                          cfg.name, cfg.storage_options(), time.perf_counter() - t0, heldout=heldout)
            summary["checkpoint"] = result.checkpoint.path
            summary["train_state"] = TRAIN_STATE
        finally:
            shutil.rmtree(local, ignore_errors=True)
        return summary
    finally:
        if started_ray and os.environ.get("SOHO_KEEP_RAY") != "1":
            ray.shutdown()
