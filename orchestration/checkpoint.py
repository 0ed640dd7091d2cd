"""Checkpoints that are either complete or ignored.

One checkpoint is one directory (merged over ranks):

    ds/...                 whatever DeepSpeed's ``save_checkpoint(dir, tag="ds")`` writes (engine, ZeRO shards)
    train_state.json       rank 0: step, samples seen, seeds, full run + model config, loss history
    rank-00000.json …      one per rank, written LAST by that rank: its loader state, RNG state, VD checksum
                           and the list of every file it wrote with its size (the per-rank commit record)
    export/                final checkpoint only: consolidated fp32 ``SohoForPretraining.save_pretrained``
    COMMITTED              storage store only: written by rank 0 after every rank's upload (the commit)

DeepSpeed's own ``latest`` file is never trusted (rank 0 writes it before the others finish). A checkpoint
counts only when it was committed (Ray's checkpoint registry, or our ``COMMITTED`` marker written last) AND
every rank record lists files that exist with the recorded sizes.

Two stores share this layout: :class:`RayStore` (``ray.train.report`` persists and commits, Ray keeps the
newest N) and :class:`StorageStore` (fsspec: a local path or ``s3://``; used without Ray, e.g. torchrun).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import fsspec

logger = logging.getLogger(__name__)

TRAIN_STATE = "train_state.json"
COMMITTED = "COMMITTED"
DS_TAG = "ds"
EXPORT_DIR = "export"
STATE_FORMAT = 1
STEP_DIR_PREFIX = "checkpoint_step_"


class IncompleteCheckpointError(RuntimeError):
    """A checkpoint directory misses files or has files of the wrong size."""


def rank_record_name(rank: int) -> str:
    return f"rank-{rank:05d}.json"


def step_dir_name(step: int) -> str:
    return f"{STEP_DIR_PREFIX}{step:08d}"


def list_files(root: Path) -> dict[str, int]:
    """{relative posix path: size} of every file under root."""
    out: dict[str, int] = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            out[path.relative_to(root).as_posix()] = path.stat().st_size
    return out


def write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_rank_record(local_dir: Path, rank: int, record: dict[str, Any], already: dict[str, int]) -> None:
    """The rank's commit record, written after everything else it wrote: files listed with sizes."""
    files = {k: v for k, v in list_files(local_dir).items() if k not in already}
    write_json_atomic(local_dir / rank_record_name(rank), {**record, "rank": rank, "files": files})


def verify_local(ckpt_dir: Path) -> dict[str, Any]:
    """Check a (downloaded or local) checkpoint; returns its train state or raises IncompleteCheckpointError."""
    state_path = ckpt_dir / TRAIN_STATE
    if not state_path.is_file():
        raise IncompleteCheckpointError(f"{ckpt_dir}: no {TRAIN_STATE}")
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise IncompleteCheckpointError(f"{state_path}: not valid JSON ({exc})") from exc
    for rank in range(int(state["world_size"])):
        rec_path = ckpt_dir / rank_record_name(rank)
        if not rec_path.is_file():
            raise IncompleteCheckpointError(f"{ckpt_dir}: rank {rank} never finished ({rec_path.name} missing)")
        record = json.loads(rec_path.read_text(encoding="utf-8"))
        for rel, size in record["files"].items():
            p = ckpt_dir / rel
            if not p.is_file() or p.stat().st_size != size:
                got = p.stat().st_size if p.is_file() else "missing"
                raise IncompleteCheckpointError(f"{ckpt_dir}: {rel} of rank {rank} is {got}, expected {size} bytes")
    return state


def read_rank_record(ckpt_dir: Path, rank: int) -> dict[str, Any]:
    return json.loads((ckpt_dir / rank_record_name(rank)).read_text(encoding="utf-8"))


@dataclass
class LocalCheckpoint:
    """A verified checkpoint available on this worker's disk; ``cleanup()`` removes a downloaded copy."""

    path: Path
    state: dict[str, Any]
    source: str
    _owned: bool = False

    def cleanup(self) -> None:
        if self._owned:
            shutil.rmtree(self.path, ignore_errors=True)


class CheckpointStore(Protocol):
    """Where committed checkpoints live. ``upload``+``commit`` are collective (every rank calls them)."""

    def latest(self) -> LocalCheckpoint | None: ...

    def upload(self, local_dir: Path, step: int) -> None: ...

    def commit(self, local_dir: Path, step: int, metrics: dict[str, Any]) -> None: ...

    def describe(self) -> str: ...


class StorageStore:
    """Checkpoints under ``{storage_path}/{run_name}/checkpoints/checkpoint_step_XXXXXXXX/`` on any fsspec
    filesystem; the ``COMMITTED`` marker, written by rank 0 after a barrier, is the commit."""

    def __init__(
        self,
        storage_path: str,
        run_name: str,
        keep: int,
        rank: int = 0,
        world_size: int = 1,
        storage_options: dict[str, Any] | None = None,
        barrier: Any = None,
    ) -> None:
        self.fs, root = fsspec.core.url_to_fs(storage_path, **(storage_options or {}))
        self.root = f"{root.rstrip('/')}/{run_name}/checkpoints"
        self.keep, self.rank, self.world_size = keep, rank, world_size
        self._barrier = barrier or (lambda: None)
        self._is_local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    def describe(self) -> str:
        return f"{self.fs.protocol}:{self.root}"

    def _step_dirs(self) -> list[tuple[int, str]]:
        if not self.fs.exists(self.root):
            return []
        out = []
        for entry in self.fs.ls(self.root, detail=False):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if name.startswith(STEP_DIR_PREFIX) and name[len(STEP_DIR_PREFIX):].isdigit():
                out.append((int(name[len(STEP_DIR_PREFIX):]), entry.rstrip("/")))
        return sorted(out, reverse=True)

    def committed_steps(self) -> list[int]:
        return [s for s, d in self._step_dirs() if self.fs.exists(f"{d}/{COMMITTED}")]

    def latest(self) -> LocalCheckpoint | None:
        for step, remote in self._step_dirs():
            if not self.fs.exists(f"{remote}/{COMMITTED}"):
                logger.warning("ignoring checkpoint at step %d: never committed (%s)", step, remote)
                continue
            if self._is_local:
                local, owned = Path(remote), False
            else:
                local = Path(tempfile.mkdtemp(prefix=f"soho-resume-{step}-r{self.rank}-"))
                self.fs.get(remote + "/", str(local) + "/", recursive=True)
                owned = True
            try:
                state = verify_local(local)
            except IncompleteCheckpointError as exc:
                logger.warning("ignoring committed but incomplete checkpoint at step %d: %s", step, exc)
                if owned:
                    shutil.rmtree(local, ignore_errors=True)
                continue
            return LocalCheckpoint(local, state, f"{self.describe()}/{step_dir_name(step)}", owned)
        return None

    def upload(self, local_dir: Path, step: int) -> None:
        remote = f"{self.root}/{step_dir_name(step)}"
        self.fs.makedirs(remote, exist_ok=True)
        for rel in list_files(local_dir):
            # Rank records go last so that a listed file is always uploaded before its record.
            if rel.startswith("rank-"):
                continue
            self._put(local_dir / rel, f"{remote}/{rel}")
        for rel in list_files(local_dir):
            if rel.startswith("rank-"):
                self._put(local_dir / rel, f"{remote}/{rel}")

    def _put(self, src: Path, dst: str) -> None:
        parent = dst.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        self.fs.put_file(str(src), dst)

    def commit(self, local_dir: Path, step: int, metrics: dict[str, Any]) -> None:
        self._barrier()  # every rank's files are uploaded
        if self.rank == 0:
            remote = f"{self.root}/{step_dir_name(step)}"
            marker = {"step": step, "world_size": self.world_size, "time": time.time(), "metrics": metrics}
            with self.fs.open(f"{remote}/{COMMITTED}.tmp", "w") as fh:
                fh.write(json.dumps(marker, sort_keys=True))
            self.fs.mv(f"{remote}/{COMMITTED}.tmp", f"{remote}/{COMMITTED}")
            self._prune(step)
        self._barrier()

    def _prune(self, newest: int) -> None:
        committed = [s for s in self.committed_steps() if s <= newest]
        for step in committed[self.keep:]:
            logger.info("removing old checkpoint at step %d (keeping %d)", step, self.keep)
            self.fs.rm(f"{self.root}/{step_dir_name(step)}", recursive=True)
        # Uncommitted leftovers older than the newest commit can never be resumed from.
        for step, remote in self._step_dirs():
            if step < newest and step not in committed:
                self.fs.rm(remote, recursive=True)


class RayStore:
    """Ray Train persists and commits: ``ray.train.report(checkpoint=…)`` uploads every rank's directory
    into one checkpoint folder under the run's storage path and registers it once all ranks reported."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def describe(self) -> str:
        return "ray.train storage"

    def latest(self) -> LocalCheckpoint | None:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        local = Path(tempfile.mkdtemp(prefix=f"soho-resume-r{self.rank}-"))
        ckpt.to_directory(str(local))
        # Ray only registers checkpoints that every rank reported, so this should never fail; if it does
        # the storage was tampered with and resuming would silently lose optimizer state.
        state = verify_local(local)
        return LocalCheckpoint(local, state, ckpt.path, _owned=True)

    def upload(self, local_dir: Path, step: int) -> None:
        """Nothing: Ray uploads inside ``report`` (which is also the commit)."""

    def commit(self, local_dir: Path, step: int, metrics: dict[str, Any]) -> None:
        import ray.train

        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(str(local_dir)),
            checkpoint_dir_name=step_dir_name(step),
        )
