"""Experiment logging beside Prometheus: TensorBoard event files (``--tensorboard-dir``) and, when the
``wandb`` package is installed, Weights & Biases (``--wandb-project``). Both are opt-in and written by rank 0
only; Prometheus (:mod:`orchestration.runtime.metrics`) stays the cluster path.

One :class:`RunLogger` per rank: ``log_step(step, record)`` after every optimizer step, ``log_eval`` after a
held-out evaluation, ``flush()`` at every checkpoint, ``close()`` at the end; every call is a no-op when
nothing is enabled or the rank is not 0. The x axis is the optimizer step.

TensorBoard: events of run ``NAME`` go to ``DIR/NAME/`` (several runs under one ``DIR`` compare in one
TensorBoard). ``DIR`` is a local path or any fsspec URL (``s3://bucket/tb``): for a remote ``DIR`` the event
file is written to a run-scoped temporary folder and copied to ``DIR/NAME/`` with fsspec at every checkpoint,
every :data:`UPLOAD_EVERY_S` seconds and at the end. A resumed run opens its writer with
``purge_step = resumed step + 1``: TensorBoard then drops what an earlier attempt logged for the steps after
the checkpoint (they are trained again), so each step shows once, with the values of the attempt that
committed it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from typing import Any

from fsspec.utils import get_protocol

from data_pipeline.storage import get_fs, join

logger = logging.getLogger(__name__)

UPLOAD_EVERY_S = 60.0  # a remote --tensorboard-dir also gets the event file this often (and at checkpoints)

# history record key -> TensorBoard tag (pre-training). Eval keys (eval_*) map to eval/<rest>.
PRETRAIN_TAGS: dict[str, str] = {
    "loss": "loss/total", "mlm": "loss/mlm", "mvm": "loss/mvm", "itm": "loss/itm", "itc": "loss/itc",
    "mlm_acc": "accuracy/mlm", "mvm_acc": "accuracy/mvm",
    "itm_acc": "accuracy/itm", "itc_acc": "accuracy/itc",
    "lr": "train/lr",
    "vd_usage": "codebook/usage", "vd_perplexity": "codebook/perplexity",
    "vd_dead_codes": "codebook/dead_codes",
    "vd_decay": "codebook/decay",
    "samples_per_s": "throughput/samples_per_s", "step_s": "throughput/step_seconds",
    "data_wait_s": "throughput/data_wait_seconds",
}
OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory"}  # no directories to make first
ITC_KEYS = ("itc", "itc_acc")  # logged only when the contrastive term is on (pretrain.itc_weight > 0)
EVAL_SKIP = ("eval_candidates", "eval_texts")  # constants of the run, not curves

WANDB_MISSING = ("wandb_project={project!r} needs the `wandb` package, which is not installed in this Python "
                 "environment: `pip install wandb` (and `wandb login`, or WANDB_API_KEY / "
                 "WANDB_MODE=offline), or drop --wandb-project")


def wandb_available() -> bool:
    return importlib.util.find_spec("wandb") is not None


def is_remote(url: str) -> bool:
    """True for fsspec URLs other than local files (``s3://``, ``gs://``, ``memory://``)."""
    return get_protocol(url) not in ("file", "local")


def pretrain_scalars(record: Mapping[str, Any], itc: bool) -> dict[str, float]:
    """TensorBoard tag -> value of one pre-training step record (keys absent from the record are skipped)."""
    out: dict[str, float] = {}
    for key, tag in PRETRAIN_TAGS.items():
        if key in record and (itc or key not in ITC_KEYS):
            out[tag] = float(record[key])
    return out


def eval_scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """``eval_<name>`` fields of a held-out evaluation -> ``eval/<name>``."""
    return {f"eval/{k[len('eval_'):]}": float(v) for k, v in record.items()
            if k.startswith("eval_") and k not in EVAL_SKIP and isinstance(v, (int, float))}


class RunLogger:
    """TensorBoard (+ W&B) scalars of one run from rank 0; every method is a no-op when disabled.

    ``tensorboard_dir``: local path or fsspec URL (events go to ``tensorboard_dir/run_name``); ``None`` = off.
    ``wandb_project``: W&B project (needs the ``wandb`` package); ``None`` = off. ``start_step``: the step
    this attempt resumes from (0 for a fresh run); earlier attempts' events of later steps are purged.
    ``storage_options``: fsspec options for a remote ``tensorboard_dir`` (the S3 endpoint)."""

    def __init__(self, *, run_name: str, rank: int = 0, tensorboard_dir: str | None = None,
                 wandb_project: str | None = None, start_step: int = 0,
                 storage_options: Mapping[str, Any] | None = None, config: Mapping[str, Any] | None = None,
                 wandb_id_seed: str = "") -> None:
        self.run_name = run_name
        self.enabled = rank == 0 and bool(tensorboard_dir or wandb_project)
        self.writer: Any = None
        self.wandb_run: Any = None
        self.log_dir: str | None = None  # where the SummaryWriter writes (a temp folder for a remote dir)
        self.remote_dir: str | None = None  # DIR/NAME when DIR is remote
        self._fs: Any = None
        self._uploaded: dict[str, int] = {}  # local event file -> size at its last upload
        self._last_upload = time.monotonic()
        if not self.enabled:
            return
        if wandb_project and not wandb_available():  # before any file is written
            raise RuntimeError(WANDB_MISSING.format(project=wandb_project))
        if tensorboard_dir:
            self._open_tensorboard(tensorboard_dir, start_step, storage_options or {})
        if wandb_project:
            self._open_wandb(wandb_project, dict(config or {}), wandb_id_seed or run_name)

    # --- set-up ---------------------------------------------------------------------------------------
    def _open_tensorboard(self, url: str, start_step: int, storage_options: Mapping[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        if is_remote(url):
            fs, root = get_fs(url, dict(storage_options))
            self._fs, self.remote_dir = fs, join(root, self.run_name)
            try:  # fail now, with the URL, rather than at the first upload an hour in
                protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
                if not protocols & OBJECT_STORES:  # (s3fs's makedirs would create a missing bucket)
                    fs.makedirs(self.remote_dir, exist_ok=True)
                probe = join(self.remote_dir, f".write-test-{os.getpid()}")
                fs.pipe_file(probe, b"")
                fs.rm_file(probe)
            except Exception as exc:
                raise RuntimeError(
                    f"--tensorboard-dir {url}: cannot write to {self.remote_dir}: {exc}") from exc
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.run_name)
            self.log_dir = tempfile.mkdtemp(prefix=f"soho-tb-{safe}-")
        else:
            local = url[len("file://"):] if url.startswith("file://") else url
            self.log_dir = os.path.join(os.path.expanduser(local), self.run_name)
            os.makedirs(self.log_dir, exist_ok=True)
        # purge_step: TensorBoard drops events of earlier attempts at steps >= start_step + 1 (retrained now)
        self.writer = SummaryWriter(log_dir=self.log_dir, purge_step=start_step + 1, flush_secs=30)
        where = f"{url.rstrip('/')}/{self.run_name}" if self.remote_dir else self.log_dir
        logger.info("TensorBoard events of run %s: %s (from step %d)", self.run_name, where, start_step + 1)

    def _open_wandb(self, project: str, config: dict[str, Any], id_seed: str) -> None:
        try:
            import wandb  # optional: not a dependency of any install level
        except ImportError as exc:
            raise RuntimeError(WANDB_MISSING.format(project=project)) from exc

        # One W&B run per training run: the same id on every relaunch/resume of it (resume="allow").
        run_id = hashlib.sha256(id_seed.encode()).hexdigest()[:16]
        self.wandb_run = wandb.init(project=project, name=self.run_name, id=run_id, resume="allow",
                                    config=config)
        # The x axis is our optimizer step (a logged field), not W&B's own call counter.
        self.wandb_run.define_metric("step")
        self.wandb_run.define_metric("*", step_metric="step")

    # --- logging --------------------------------------------------------------------------------------
    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled or not scalars:
            return
        if self.writer is not None:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, global_step=step)
            if self.remote_dir is not None and time.monotonic() - self._last_upload >= UPLOAD_EVERY_S:
                self.writer.flush()
                self._upload()
        if self.wandb_run is not None:
            self.wandb_run.log({**scalars, "step": step})

    def log_step(self, step: int, record: Mapping[str, Any], *, itc: bool = False) -> None:
        """One pre-training step record (the history log's fields) at optimizer step ``step``."""
        if self.enabled:
            self.log_scalars(step, pretrain_scalars(record, itc))

    def log_eval(self, step: int, record: Mapping[str, Any]) -> None:
        """A held-out evaluation's ``eval_*`` figures at optimizer step ``step``."""
        if self.enabled:
            self.log_scalars(step, eval_scalars(record))

    def flush(self) -> None:
        """Make what was logged durable (and, for a remote dir, uploaded): called at every checkpoint."""
        if self.writer is not None:
            self.writer.flush()
            if self.remote_dir is not None:
                self._upload()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            if self.remote_dir is not None:
                self._upload()
                if self.log_dir:
                    shutil.rmtree(self.log_dir, ignore_errors=True)
            self.writer = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
        self.enabled = False

    def _upload(self) -> None:
        """Copy each local event file that grew since its last upload to the remote dir (whole file: event
        files are small and append-only). A failure is logged and retried at the next upload."""
        self._last_upload = time.monotonic()
        assert self.log_dir is not None and self.remote_dir is not None
        for name in sorted(os.listdir(self.log_dir)):
            local = os.path.join(self.log_dir, name)
            size = os.path.getsize(local)
            if self._uploaded.get(name) == size:
                continue
            try:
                self._fs.put_file(local, join(self.remote_dir, name))
            except Exception as exc:  # metrics must not kill training; the next upload tries again
                logger.warning("TensorBoard upload of %s to %s failed (retried later): %s",
                               name, self.remote_dir, exc)
                continue
            self._uploaded[name] = size
