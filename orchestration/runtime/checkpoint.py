"""Checkpoints that are either complete and intact, or ignored.

One checkpoint is one directory (merged over ranks):

    ds/...                 whatever DeepSpeed's ``save_checkpoint(dir, tag="ds")`` writes
                           (engine, ZeRO shards)
    train_state.json       rank 0: step, samples seen, seeds, full run + model config (no per-step history)
    rank-00000.json …      one per rank, written LAST by that rank: its loader state, RNG state, VD checksum
                           and every file it wrote with its size and sha256 (the per-rank commit record)
    export/                final checkpoint only: consolidated fp32 ``SohoForPretraining.save_pretrained``
    COMMITTED              storage store only: written by rank 0 after every rank's upload (the commit)

DeepSpeed's own ``latest`` file is never trusted (rank 0 writes it before the others finish). A checkpoint
counts only when it was committed (Ray's checkpoint registry, or our ``COMMITTED`` marker written last) AND
every rank record lists files that exist with the recorded sizes and sha256 digests. The records are the only
thing parsed before that check (JSON, never pickle); ``train_state.json`` and DeepSpeed's files are read only
after their digests match. A mismatch (bit rot, a partial upload, a replaced file) makes resume fall back to
the previous committed checkpoint and log which file, which digest was expected and which was found.

Trust: a digest does not stop someone who can also rewrite the records. DeepSpeed 0.19.8 loads its files with
``torch.load(weights_only=False)`` (full pickle: a planted file runs code on every worker at resume). Two ways
out were considered: (a) force ``weights_only=True`` on every load, allow-listing the few non-tensor types
DeepSpeed's files hold, or (b) HMAC-sign the records with a key from the run's Secret. We use (a), measured on
DeepSpeed 0.19.8 checkpoints of ZeRO-0 (fp32, bf16), ZeRO-1 (fp32), ZeRO-2 (bf16, hybrid SGD/AdamW) and ZeRO-3
(bf16): besides tensors, storages, ``torch.Size`` and ``OrderedDict`` (allowed by torch itself) their pickles
hold exactly three other globals, ``deepspeed.runtime.fp16.loss_scaler.LossScaler``,
``deepspeed.runtime.zero.config.ZeroStageEnum`` and ``deepspeed.utils.tensor_fragment.fragment_address``
(plus ``DynamicLossScaler`` for fp16) — plain data classes and an int enum, so allow-listing them lets the
weights-only unpickler load every file. (a) needs no key distribution or rotation, protects runs whose Secret
leaked along with the bucket, and also covers files outside the records; (b) would still unpickle whatever a
key holder signed. Every ``.pt`` file is first test-loaded weights-only (memory-mapped, cheap) during
verification, so a refused file makes resume fall back like a digest mismatch, on all ranks together; the
real load then runs inside :func:`weights_only_loads`, which forces ``weights_only=True`` on DeepSpeed's
``torch.load`` calls too (a file swapped after verification still cannot run code).

Two stores share this layout: :class:`RayStore` (``ray.train.report`` persists and commits, Ray keeps the
newest N) and :class:`StorageStore` (fsspec: a local path or ``s3://``; used without Ray, e.g. torchrun).

Beside the checkpoints, ``{storage}/{run}/history/`` holds the run's per-step history as append-only JSONL
segments (:class:`HistoryLog`: one object per checkpoint interval, never rewritten), so a checkpoint's size
does not grow with the step count. Temporary staging folders carry the run's key and rank in their name
(:class:`Staging`) so a restarted rank removes what a killed predecessor left behind, and nothing else.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import fsspec
import torch

logger = logging.getLogger(__name__)

TRAIN_STATE = "train_state.json"
COMMITTED = "COMMITTED"
DS_TAG = "ds"
EXPORT_DIR = "export"
STATE_FORMAT = 2  # 2: sha256 in the rank records, history moved out to the history log
STEP_DIR_PREFIX = "checkpoint_step_"
HISTORY_DIR = "history"
# Ray Train's controller writes this beside the checkpoint folders after registering one (Train V2).
RAY_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"
_HASH_CHUNK = 1 << 20

Agree = Callable[[bool], bool]
"""Collective vote: called by every rank with its own verdict, returns True only if every rank said True."""


class IncompleteCheckpointError(RuntimeError):
    """A checkpoint directory misses files or has files of the wrong size."""


class CorruptCheckpointError(IncompleteCheckpointError):
    """A file's sha256 differs from its rank record, or a file the loader would read is in no record."""


class UntrustedCheckpointError(IncompleteCheckpointError):
    """A checkpoint file that the weights-only unpickler refuses (it would need to run code to load)."""


def rank_record_name(rank: int) -> str:
    return f"rank-{rank:05d}.json"


def step_dir_name(step: int) -> str:
    return f"{STEP_DIR_PREFIX}{step:08d}"


def parse_step_dir(name: str) -> int | None:
    name = name.rstrip("/").rsplit("/", 1)[-1]
    digits = name[len(STEP_DIR_PREFIX):]
    return int(digits) if name.startswith(STEP_DIR_PREFIX) and digits.isdigit() else None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


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


def write_rank_record(local_dir: Path, rank: int, record: dict[str, Any], already: dict[str, int],
                      world_size: int | None = None) -> None:
    """The rank's commit record, written after everything else it wrote: files listed with size and sha256."""
    files = {k: {"size": v, "sha256": sha256_file(local_dir / k)}
             for k, v in list_files(local_dir).items() if k not in already}
    extra = {"world_size": world_size} if world_size is not None else {}
    write_json_atomic(local_dir / rank_record_name(rank), {**record, **extra, "rank": rank, "files": files})


def _read_json_file(path: Path, missing: str, invalid: type[Exception]) -> Any:
    """A checkpoint's JSON file (never pickle): ``IncompleteCheckpointError(missing)`` when absent,
    ``invalid`` when it does not parse."""
    if not path.is_file():
        raise IncompleteCheckpointError(missing)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise invalid(f"{path}: not valid JSON ({exc})") from exc


def _read_record(ckpt_dir: Path, rank: int) -> dict[str, Any]:
    path = ckpt_dir / rank_record_name(rank)
    record = _read_json_file(path, f"{ckpt_dir}: rank {rank} never finished ({path.name} missing)",
                             CorruptCheckpointError)
    if not isinstance(record, dict) or not isinstance(record.get("files"), dict):
        raise CorruptCheckpointError(f"{path}: no 'files' table")
    return record


def _check_files(ckpt_dir: Path, rank: int, files: dict[str, Any]) -> bool:
    """Size then sha256 of every listed file; True when the record carried digests (format 2)."""
    hashed = True
    for rel, entry in files.items():
        if isinstance(entry, dict):
            size, digest = entry.get("size"), entry.get("sha256")
        else:  # a format-1 record: sizes only
            size, digest = entry, None
        p = ckpt_dir / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise CorruptCheckpointError(
                f"{ckpt_dir}: rank {rank} lists {rel!r}, a path outside the checkpoint")
        if not p.is_file() or p.stat().st_size != size:
            got = p.stat().st_size if p.is_file() else "missing"
            raise IncompleteCheckpointError(
                f"{ckpt_dir}: {rel} of rank {rank} is {got}, expected {size} bytes")
        if digest is None:
            hashed = False
            continue
        got_digest = sha256_file(p)
        if got_digest != digest:
            raise CorruptCheckpointError(
                f"{ckpt_dir}: {rel} of rank {rank} has sha256 {got_digest}, expected {digest} (same size "
                f"{size} bytes: the file was changed after it was written)")
    return hashed


def verify_local(ckpt_dir: Path, *, check_pickles: bool = True) -> dict[str, Any]:
    """Check a (downloaded or local) checkpoint; returns its train state or raises IncompleteCheckpointError
    (or its subclasses :class:`CorruptCheckpointError`, :class:`UntrustedCheckpointError`).

    Order matters: the rank records (JSON) are read first, every listed file is checked against its size
    and sha256, every file DeepSpeed or we would read must be listed, and only then is ``train_state.json``
    parsed and each ``.pt`` file test-loaded with the weights-only unpickler (``check_pickles``)."""
    record0 = _read_record(ckpt_dir, 0)
    world_size = record0.get("world_size")
    listed: set[str] = set()
    hashed = _check_files(ckpt_dir, 0, record0["files"])
    listed.update(record0["files"])
    if world_size is None:  # format 1: world size only in the train state (its size was checked above)
        world_size = _parse_state(ckpt_dir)["world_size"]
    for rank in range(1, int(world_size)):
        record = _read_record(ckpt_dir, rank)
        hashed = _check_files(ckpt_dir, rank, record["files"]) and hashed
        listed.update(record["files"])
    if not hashed:
        logger.warning("%s: rank records without sha256 (written before format 2): sizes checked only",
                       ckpt_dir)
    # Whatever would be deserialised must be covered by a record: an extra planted file is refused too.
    loadable = [rel for rel in list_files(ckpt_dir)
                if rel == TRAIN_STATE or rel.startswith(f"{DS_TAG}/") or rel.startswith(f"{EXPORT_DIR}/")]
    unlisted = sorted(set(loadable) - listed)
    if TRAIN_STATE not in listed:
        raise CorruptCheckpointError(f"{ckpt_dir}: {TRAIN_STATE} is listed in no rank record")
    if unlisted:
        raise CorruptCheckpointError(f"{ckpt_dir}: {unlisted[:5]} are listed in no rank record")
    state = _parse_state(ckpt_dir)
    if int(state["world_size"]) != int(world_size):
        raise CorruptCheckpointError(
            f"{ckpt_dir}: {TRAIN_STATE} says world_size {state['world_size']}, rank 0's record {world_size}")
    if check_pickles:
        for rel in sorted(loadable):
            if rel.endswith((".pt", ".pth", ".bin")):
                check_weights_only(ckpt_dir / rel)
    return state


def _parse_state(ckpt_dir: Path) -> dict[str, Any]:
    state_path = ckpt_dir / TRAIN_STATE
    state = _read_json_file(state_path, f"{ckpt_dir}: no {TRAIN_STATE}", IncompleteCheckpointError)
    if not isinstance(state, dict) or "world_size" not in state:
        raise CorruptCheckpointError(f"{state_path}: no world_size")
    return state


def read_rank_record(ckpt_dir: Path, rank: int) -> dict[str, Any]:
    return json.loads((ckpt_dir / rank_record_name(rank)).read_text(encoding="utf-8"))


# --- weights-only loading --------------------------------------------------------------------------
def deepspeed_safe_globals() -> list[Any]:
    """The non-tensor types DeepSpeed 0.19.8 pickles into its checkpoint files (measured: see module doc)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def check_weights_only(path: Path) -> None:
    """Test-load one file with the weights-only unpickler (memory-mapped: tensors are not read)."""
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            # torch.save's zip format (what DeepSpeed writes) maps lazily; a legacy-format file is read whole
            torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError, OSError) as exc:
        first = str(exc).strip().splitlines()
        reason = next((ln for ln in first if "GLOBAL" in ln or "Unsupported" in ln),
                      first[0] if first else "")
        raise UntrustedCheckpointError(
            f"{path}: refused by the weights-only loader ({type(exc).__name__}: {reason.strip()[:300]}); "
            f"a checkpoint file must hold only tensors and DeepSpeed's allow-listed types, never code"
        ) from exc


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Inside: every ``torch.load`` (DeepSpeed's checkpoint engine calls it with ``weights_only=False``) runs
    weights-only with DeepSpeed's few types allow-listed. Process-wide while active: use around a load
    only."""
    original = torch.load

    def forced(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    torch.load = forced
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            yield
    finally:
        torch.load = original


# --- staging folders --------------------------------------------------------------------------------
def run_key(storage_path: str, run_name: str) -> str:
    """A file-name-safe key of one run: its name plus a digest of (storage path, name)."""
    where = storage_path if "://" in storage_path else os.path.abspath(storage_path)
    digest = hashlib.sha256(f"{where}|{run_name}".encode()).hexdigest()[:10]
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", run_name)[:40]
    return f"{safe}-{digest}"


class Staging:
    """Temporary folders of one rank of one run: ``{tmp}/soho-stage-{run key}-r{rank}-{kind}-XXXX``."""

    def __init__(self, storage_path: str, run_name: str, rank: int, root: str | None = None) -> None:
        self.root = Path(root or tempfile.gettempdir())
        self.prefix = f"soho-stage-{run_key(storage_path, run_name)}-r{rank}-"

    def new(self, kind: str) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"{self.prefix}{kind}-", dir=self.root))

    def remove_stale(self) -> list[str]:
        """Remove this rank's leftovers of earlier (killed) attempts of the same run; call before staging."""
        removed = []
        for path in sorted(self.root.glob(f"{self.prefix}*")):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path.name)
        if removed:
            logger.info("removed %d stale staging folder(s) of this run: %s", len(removed), removed[:5])
        return removed


# --- per-step history -------------------------------------------------------------------------------
class HistoryLog:
    """The run's per-step history: ``{storage}/{run}/history/steps-FIRST-LAST.jsonl``, one JSON object per
    step. Rank 0 adds one segment per checkpoint (the steps since the previous one) before committing it;
    segments are never rewritten (object stores have no append). Reading joins them; a step that appears in
    two segments (a replay after falling back to an older checkpoint) keeps the newer segment's record."""

    def __init__(self, fs: Any, run_dir: str) -> None:
        self.fs = fs
        self.dir = f"{run_dir.rstrip('/')}/{HISTORY_DIR}"

    @classmethod
    def for_run(cls, storage_path: str, run_name: str,
                storage_options: dict[str, Any] | None = None) -> HistoryLog:
        fs, root = fsspec.core.url_to_fs(storage_path, **(storage_options or {}))
        return cls(fs, f"{root.rstrip('/')}/{run_name}")

    def segments(self) -> list[tuple[int, int, str]]:
        try:
            self.fs.invalidate_cache(self.dir)
        except (AttributeError, TypeError):
            pass
        if not self.fs.exists(self.dir):
            return []
        out = []
        for entry in self.fs.ls(self.dir, detail=False):
            m = re.fullmatch(r"steps-(\d+)-(\d+)\.jsonl", entry.rstrip("/").rsplit("/", 1)[-1])
            if m:
                out.append((int(m.group(1)), int(m.group(2)), entry.rstrip("/")))
        return sorted(out)

    def append(self, records: list[dict[str, Any]]) -> str | None:
        if not records:
            return None
        first, last = int(records[0]["step"]), int(records[-1]["step"])
        path = f"{self.dir}/steps-{first:08d}-{last:08d}.jsonl"
        data = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode()
        self.fs.makedirs(self.dir, exist_ok=True)
        tmp = f"{path}.tmp"
        self.fs.pipe_file(tmp, data)  # one whole-object write, then a rename: never a half segment
        self.fs.mv(tmp, path)
        return path

    def read(self, upto: int | None = None) -> list[dict[str, Any]]:
        by_step: dict[int, dict[str, Any]] = {}
        for _, _, path in self.segments():
            for line in self.fs.cat_file(path).decode("utf-8").splitlines():
                if line.strip():
                    rec = json.loads(line)
                    by_step[int(rec["step"])] = rec
        return [by_step[s] for s in sorted(by_step) if upto is None or s <= upto]

    def truncate_after(self, step: int) -> list[str]:
        """Drop segments that start after ``step``: steps of an attempt whose checkpoint was never committed
        (or was refused at resume); the resumed run replays them."""
        gone = [p for first, _, p in self.segments() if first > step]
        for p in gone:
            self.fs.rm(p)
        if gone:
            logger.info("history: dropped %d segment(s) after step %d (never committed)", len(gone), step)
        return gone


def read_history(storage_path: str, run_name: str, upto: int | None = None,
                 storage_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The per-step history of a run (all of it, or up to step ``upto``)."""
    return HistoryLog.for_run(storage_path, run_name, storage_options).read(upto)


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
    """Where committed checkpoints live. ``upload``+``commit`` are collective (every rank calls them), and so
    is ``latest`` when given ``agree``."""

    staging: Staging | None

    def latest(self, agree: Agree | None = None) -> LocalCheckpoint | None: ...

    def upload(self, local_dir: Path, step: int) -> None: ...

    def commit(self, local_dir: Path, step: int, metrics: dict[str, Any]) -> None: ...

    def describe(self) -> str: ...


def _stage(staging: Staging | None, kind: str, rank: int) -> Path:
    if staging is not None:
        return staging.new(kind)
    return Path(tempfile.mkdtemp(prefix=f"soho-stage-{kind}-r{rank}-"))


def _pick(candidates: list[tuple[int, str, Callable[[], tuple[Path, bool]]]], describe: str,
          agree: Agree | None) -> LocalCheckpoint | None:
    """Newest candidate that verifies on every rank. ``candidates``: (step, source, fetch → (dir, owned))."""
    for step, source, fetch in candidates:
        local, owned, state, why = None, False, None, ""
        try:
            local, owned = fetch()
            state = verify_local(local)
        except IncompleteCheckpointError as exc:
            why = str(exc)
        except (OSError, ValueError) as exc:  # a download that failed half-way
            why = f"could not fetch {source}: {type(exc).__name__}: {exc}"
        ok = state is not None
        if agree is not None:
            everyone = agree(ok)
            if ok and not everyone:
                why = "another rank could not verify it (see that rank's log)"
            ok = everyone
        if ok:
            assert local is not None and state is not None
            return LocalCheckpoint(local, state, source, owned)
        logger.warning("ignoring committed checkpoint at step %d (%s): %s; falling back to the previous one",
                       step, describe, why)
        if owned and local is not None:
            shutil.rmtree(local, ignore_errors=True)
    return None


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
        staging: Staging | None = None,
    ) -> None:
        self.fs, root = fsspec.core.url_to_fs(storage_path, **(storage_options or {}))
        self.root = f"{root.rstrip('/')}/{run_name}/checkpoints"
        self.keep, self.rank, self.world_size = keep, rank, world_size
        self._barrier = barrier or (lambda: None)
        self._is_local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple)
                                    else (self.fs.protocol,))
        self.staging: Staging | None = staging or Staging(storage_path, run_name, rank)

    def describe(self) -> str:
        return f"{self.fs.protocol}:{self.root}"

    def _step_dirs(self) -> list[tuple[int, str]]:
        if not self.fs.exists(self.root):
            return []
        out = []
        for entry in self.fs.ls(self.root, detail=False):
            step = parse_step_dir(entry)
            if step is not None:
                out.append((step, entry.rstrip("/")))
        return sorted(out, reverse=True)

    def committed_steps(self) -> list[int]:
        return [s for s, d in self._step_dirs() if self.fs.exists(f"{d}/{COMMITTED}")]

    def latest(self, agree: Agree | None = None) -> LocalCheckpoint | None:
        candidates = []
        for step, remote in self._step_dirs():
            if not self.fs.exists(f"{remote}/{COMMITTED}"):
                logger.warning("ignoring checkpoint at step %d: never committed (%s)", step, remote)
                continue

            def fetch(step: int = step, remote: str = remote) -> tuple[Path, bool]:
                if self._is_local:
                    return Path(remote), False
                local = _stage(self.staging, f"resume-{step}", self.rank)
                self.fs.get(remote + "/", str(local) + "/", recursive=True)
                return local, True

            candidates.append((step, f"{self.describe()}/{step_dir_name(step)}", fetch))
        return _pick(candidates, self.describe(), agree)

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


def ray_fallback_dirs(names: list[str], latest_step: int, snapshot_text: str | None) -> list[tuple[int, str]]:
    """Older checkpoint folders Ray still keeps, newest first: ``checkpoint_step_*`` names below the latest
    registered one that Ray's checkpoint-manager snapshot names (all of them when there is no snapshot)."""
    out = []
    for name in names:
        step = parse_step_dir(name)
        if step is None or step >= latest_step:
            continue
        if snapshot_text is not None and step_dir_name(step) not in snapshot_text:
            continue  # not registered (an upload that was never reported) or already dropped by Ray
        out.append((step, name.rstrip("/").rsplit("/", 1)[-1]))
    return sorted(out, reverse=True)


class RayStore:
    """Ray Train persists and commits: ``ray.train.report(checkpoint=…)`` uploads every rank's directory
    into one checkpoint folder under the run's storage path and registers it once all ranks reported.
    ``latest`` starts at the checkpoint Ray hands back and falls back to the older ones Ray keeps
    (``num_to_keep``), read through the same filesystem Ray uses."""

    def __init__(self, rank: int, staging: Staging | None = None) -> None:
        self.rank = rank
        self.staging = staging

    def describe(self) -> str:
        return "ray.train storage"

    def latest(self, agree: Agree | None = None) -> LocalCheckpoint | None:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        latest_step = parse_step_dir(ckpt.path)
        candidates = [(latest_step if latest_step is not None else -1, ckpt.path, self._fetcher(ckpt))]
        if latest_step is not None:
            candidates += self._older(ckpt, latest_step)
        return _pick(candidates, self.describe(), agree)

    def _fetcher(self, ckpt: Any) -> Callable[[], tuple[Path, bool]]:
        def fetch() -> tuple[Path, bool]:
            local = _stage(self.staging, "resume", self.rank)
            ckpt.to_directory(str(local))
            return local, True

        return fetch

    def _older(self, ckpt: Any, latest_step: int) -> list[tuple[int, str, Callable[[], tuple[Path, bool]]]]:
        import pyarrow.fs
        import ray.train

        fs, parent = ckpt.filesystem, ckpt.path.rstrip("/").rsplit("/", 1)[0]
        try:
            infos = fs.get_file_info(pyarrow.fs.FileSelector(parent))
            names = [i.base_name for i in infos if i.type == pyarrow.fs.FileType.Directory]
            snap = f"{parent}/{RAY_SNAPSHOT_FILE}"
            text = None
            if fs.get_file_info(snap).type == pyarrow.fs.FileType.File:
                with fs.open_input_stream(snap) as fh:
                    text = fh.read().decode("utf-8", "replace")
        except OSError as exc:
            logger.warning("cannot list older checkpoints beside %s: %s", ckpt.path, exc)
            return []
        out = []
        for step, name in ray_fallback_dirs(names, latest_step, text):
            older = ray.train.Checkpoint(path=f"{parent}/{name}", filesystem=fs)
            out.append((step, older.path, self._fetcher(older)))
        return out

    def upload(self, local_dir: Path, step: int) -> None:
        """Nothing: Ray uploads inside ``report`` (which is also the commit)."""

    def commit(self, local_dir: Path, step: int, metrics: dict[str, Any]) -> None:
        import ray.train

        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(str(local_dir)),
            checkpoint_dir_name=step_dir_name(step),
        )
