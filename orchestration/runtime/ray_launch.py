"""Ray for any job: one logging set-up, joining or starting Ray, and a ``TorchTrainer`` from a scale section.

Pre-training (``orchestration.pretrain.launch``) and fine-tuning (``orchestration.finetune.launch``) run
their Ray-free worker functions through :func:`build_torch_trainer`; Ray is imported only in here (lazily:
it is heavy, and local runs never need it).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from typing import Any

from orchestration.runtime.config import ScaleConfig

logger = logging.getLogger(__name__)

NOISY_LOGGERS = ("DeepSpeed", "deepspeed", "torch.distributed")


def configure_logging() -> None:
    """INFO to stderr with time and logger name, unless the application set up logging already;
    DeepSpeed's and torch.distributed's chatter at WARNING."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)


def worker_process_setup() -> None:
    """First thing in a Ray Train worker: logging, and normal scheduling priority. Ray starts worker
    processes at niceness 15 (meant for its helpers); a training worker is the node's main work and must not
    be starved by ordinary processes. Lowering it needs CAP_SYS_NICE: best effort."""
    configure_logging()
    try:
        os.setpriority(os.PRIO_PROCESS, 0, 0)
    except OSError:
        pass


# Settings a Ray worker needs that a `ray start` node may lack. Never credentials: Ray shows a runtime_env in
# its job info, dashboard and logs. Workers read AWS_* (incl. AWS_SESSION_TOKEN) or a credentials file from
# the environment they already have: a local Ray started by this driver inherits the driver's environment,
# the nodes of a `ray start` / KubeRay cluster have their own (on Kubernetes: the soho-s3-credentials
# Secret).
RUNTIME_ENV_VARS = ("SOHO_FAULT_DIR", "SOHO_CACHE_DIR", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                    "AWS_DEFAULT_REGION")
SECRET_ENV_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|ACCESS_KEY|CREDENTIAL|SESSION|PRIVATE", re.I)


def ray_runtime_env(use_gpu: bool, environ: dict[str, str] | None = None) -> dict[str, Any]:
    """The runtime_env the driver passes to ``ray.init``: non-secret settings only."""
    environ = os.environ if environ is None else environ
    env_vars = {"DS_ACCELERATOR": "cuda" if use_gpu else "cpu", "PYTHONUNBUFFERED": "1"}
    env_vars.update({k: environ[k] for k in RUNTIME_ENV_VARS if k in environ})
    leaked = sorted(k for k in env_vars if SECRET_ENV_NAME.search(k))
    if leaked:  # a guard for whoever extends RUNTIME_ENV_VARS
        raise RuntimeError(
            f"refusing to put {leaked} into Ray's runtime_env: workers read secrets from their env")
    return {"env_vars": env_vars}


def connect_ray(address: str | None, num_cpus: int, runtime_env: dict[str, Any]) -> tuple[bool, bool]:
    """Join Ray: an initialised one in this process, else ``address`` / ``$RAY_ADDRESS``, else a cluster that
    ``ray start`` made on this machine, else start a local one with ``num_cpus`` (at least this machine's
    cores). Returns (this call initialised Ray — the caller shuts it down, it joined an existing cluster)."""
    import ray

    if ray.is_initialized():
        return False, True
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"runtime_env": runtime_env, "log_to_driver": True}
    if address:
        ray.init(address=address, **kwargs)
        return True, True
    try:  # a cluster that `ray start` made on this machine
        ray.init(address="auto", **kwargs)
        return True, True
    except ConnectionError:
        ray.init(num_cpus=max(num_cpus, os.cpu_count() or 1), include_dashboard=False, **kwargs)
        return True, False


def build_torch_trainer(entry: Callable[[dict[str, Any]], None], loop_config: dict[str, Any],
                        scale: ScaleConfig, *, name: str, storage_path: str, storage_filesystem: Any = None,
                        max_failures: int = 0, keep_checkpoints: int | None = None,
                        cpus_per_worker: int | None = None, elastic: bool = False) -> Any:
    """A Ray Train ``TorchTrainer`` running ``entry(loop_config)`` on ``scale.num_workers`` workers (gloo on
    CPU, NCCL with one GPU each), restarting the group up to ``max_failures`` times. ``elastic``: the job can
    resume on another worker count, so ``scale.min_workers`` > 0 becomes Ray Train V2's elastic range
    ``ScalingConfig(num_workers=(min_workers, num_workers))``; a job that cannot refuses ``min_workers``."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    if scale.min_workers and not elastic:
        raise ValueError(f"min_workers={scale.min_workers}: this job resumes only on the worker count that "
                         "wrote its checkpoints; drop --min-workers")
    cpus = scale.cpus_per_worker if cpus_per_worker is None else cpus_per_worker
    workers: int | tuple[int, int] = ((scale.min_workers, scale.num_workers) if scale.min_workers
                                      else scale.num_workers)
    return TorchTrainer(
        entry,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, use_gpu=scale.use_gpu,
            resources_per_worker={"CPU": cpus, **({"GPU": 1} if scale.use_gpu else {})},
        ),
        torch_config=TorchConfig(backend="nccl" if scale.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep_checkpoints),
        ),
    )


def shutdown_ray() -> None:
    """Stop the Ray this process started, unless ``SOHO_KEEP_RAY=1`` (tests that share one Ray)."""
    import ray

    if os.environ.get("SOHO_KEEP_RAY") != "1":
        ray.shutdown()
