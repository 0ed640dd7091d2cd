"""Test-only fault injection: real process deaths (SIGKILL), not raised exceptions.

Each fault fires once per run: before killing, the worker creates a marker file named after the storage
path, run name and fault in ``$SOHO_FAULT_DIR`` (default ``<tmp>/soho-faults``), which every worker on the
node sees, so the restarted worker group does not die again at the same step.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec

from orchestration.runtime.checkpoint import step_dir_name
from orchestration.runtime.config import FaultConfig

logger = logging.getLogger(__name__)

# Ray Train's controller writes this after registering a checkpoint (Train V2).
RAY_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"


@dataclass(frozen=True)
class FaultSite:
    """The faults a run asks for and where that run lives (its storage path and name)."""

    faults: FaultConfig
    storage_path: str
    name: str
    storage_options: dict[str, Any] = field(default_factory=dict)


def _marker(cfg: FaultSite, kind: str, step: int) -> Path:
    root = Path(os.environ.get("SOHO_FAULT_DIR") or Path(tempfile.gettempdir()) / "soho-faults")
    where = os.path.abspath(cfg.storage_path) if "://" not in cfg.storage_path else cfg.storage_path
    run_id = hashlib.sha256(f"{where}|{cfg.name}".encode()).hexdigest()[:16]
    return root / f"{run_id}-{kind}-{step}"


def _claim(cfg: FaultSite, kind: str, step: int) -> bool:
    """True exactly once per (run, fault): atomically create the marker."""
    marker = _marker(cfg, kind, step)
    marker.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def _die(reason: str) -> None:
    logger.warning("FAULT INJECTION: %s; sending SIGKILL to pid %d", reason, os.getpid())
    for handler in logging.getLogger().handlers:
        handler.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def maybe_crash_during_checkpoint(cfg: FaultSite, step: int, rank: int) -> None:
    """Rank 0 dies after its checkpoint files are written/uploaded but before the commit."""
    if cfg.faults.fault_crash_during_checkpoint != step or rank != 0:
        return
    if _claim(cfg, "crash-during-checkpoint", step):
        _die(f"crash while writing the checkpoint at step {step}")


def maybe_kill_after_checkpoint(cfg: FaultSite, step: int, rank: int, under_ray: bool,
                                timeout_s: float = 60.0) -> None:
    """``fault_kill_rank`` dies once the checkpoint at ``step`` is committed.

    Under Ray the report returns before the controller has registered the checkpoint; dying at once could
    lose it, so wait until the controller's snapshot in storage names it (bounded by ``timeout_s``).
    """
    if cfg.faults.fault_kill_after_checkpoint != step or rank != cfg.faults.fault_kill_rank:
        return
    if not _claim(cfg, "kill-after-checkpoint", step):
        return
    if under_ray:
        fs, root = fsspec.core.url_to_fs(cfg.storage_path, **cfg.storage_options)
        snapshot = f"{root.rstrip('/')}/{cfg.name}/{RAY_SNAPSHOT_FILE}"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if fs.exists(snapshot):
                    fs.invalidate_cache()
                    with fs.open(snapshot, "r") as fh:
                        if step_dir_name(step) in fh.read():
                            break
            except (OSError, ValueError):
                pass
            time.sleep(0.25)
        else:
            logger.warning("checkpoint at step %d not seen in %s after %.0f s; killing anyway",
                           step, snapshot, timeout_s)
    _die(f"worker of rank {rank} lost after the checkpoint at step {step}")
