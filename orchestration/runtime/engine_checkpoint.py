"""A training engine's state into and out of a committed checkpoint, for any job.

The layout, the rank records, the commit and the verification are :mod:`orchestration.runtime.checkpoint`'s;
this module adds the two steps every job repeats around them: write the engine's state into a staging
folder and commit it through a store (:func:`commit_checkpoint`), and load it back from a verified
checkpoint (:func:`load_engine_state`). Fine-tuning uses both; pre-training saves through them (its resume
adds the world-size switch of :mod:`orchestration.runtime.reshard`).

Where the engine's state goes:

* a DeepSpeed engine: ``ds/`` as DeepSpeed's ``save_checkpoint(dir, tag="ds")`` writes it (every rank; its
  ``latest`` file is removed, it is no commit marker);
* a plain-torch engine (``--engine torch``, DDP replicas): ``ds/torch_engine.pt`` written by rank 0, holding
  the module's ``state_dict`` and the optimiser's, tensors and plain values only, so that the weights-only
  verification of every ``ds/`` file covers it like DeepSpeed's.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from orchestration.runtime.checkpoint import (
    DS_TAG,
    STATE_FORMAT,
    TRAIN_STATE,
    CheckpointStore,
    LocalCheckpoint,
    UntrustedCheckpointError,
    weights_only_loads,
    write_json_atomic,
    write_rank_record,
)
from orchestration.runtime.distributed import unwrap

logger = logging.getLogger(__name__)

TORCH_ENGINE_FILE = "torch_engine.pt"


def _kind(engine: Any) -> str:
    return getattr(engine, "kind", "deepspeed")


def save_engine_state(built: Any, local: Path, rank: int) -> None:
    """Write the engine's model and optimiser state under ``local/ds/`` (collective for DeepSpeed).
    ``built``: an :class:`orchestration.runtime.engine.Engine`."""
    if _kind(built) == "deepspeed":
        built.engine.save_checkpoint(str(local), tag=DS_TAG)
        (local / "latest").unlink(missing_ok=True)  # DeepSpeed's `latest` is not a commit marker
        return
    if rank == 0:  # DDP replicas hold the same weights and optimiser state
        (local / DS_TAG).mkdir(parents=True, exist_ok=True)
        torch.save({"module": unwrap(built.engine).state_dict(), "optimizer": built.optimizer.state_dict()},
                   local / DS_TAG / TORCH_ENGINE_FILE)


def load_engine_state(built: Any, ckpt: LocalCheckpoint) -> None:
    """Load model and optimiser state from a verified checkpoint into the engine (every rank). Loads run
    weights-only: a file swapped after verification still cannot run code."""
    try:
        if _kind(built) == "deepspeed":
            with weights_only_loads():
                load_path, _ = built.engine.load_checkpoint(str(ckpt.path), tag=DS_TAG,
                                                            load_optimizer_states=True,
                                                            load_lr_scheduler_states=False)
            if load_path is None:
                raise RuntimeError(f"DeepSpeed could not load {ckpt.source}")
            return
        path = ckpt.path / DS_TAG / TORCH_ENGINE_FILE
        if not path.is_file():
            raise RuntimeError(
                f"{ckpt.source}: no {DS_TAG}/{TORCH_ENGINE_FILE}; the checkpoint was written by another "
                "engine (relaunch with the --engine it was written with)")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UntrustedCheckpointError(
            f"{ckpt.source}: a checkpoint file was refused by the weights-only loader while loading "
            f"(changed after verification?): {str(exc).strip().splitlines()[0][:300]}") from exc
    unwrap(built.engine).load_state_dict(state["module"], strict=True)
    built.optimizer.load_state_dict(state["optimizer"])


def commit_checkpoint(store: CheckpointStore, local: Path, step: int, *, rank: int, world_size: int,
                      train_state: dict[str, Any], rank_record: dict[str, Any], metrics: dict[str, Any],
                      before_upload: Callable[[], None] | None = None,
                      before_commit: Callable[[], None] | None = None) -> None:
    """Finish and commit a staged checkpoint whose engine state is already in ``local`` (collective):
    rank 0 writes ``train_state.json`` (``train_state`` plus the format and the world size), every rank its
    record (written last: its files with size and sha256), then upload and commit through ``store``.
    ``before_upload`` runs after the records (e.g. the history segment of the steps since the last
    checkpoint), ``before_commit`` after the upload (e.g. a test's fault injection)."""
    if rank == 0:
        write_json_atomic(local / TRAIN_STATE,
                          {"format": STATE_FORMAT, **train_state, "world_size": world_size})
    write_rank_record(local, rank, rank_record, already={}, world_size=world_size)
    if before_upload is not None:
        before_upload()
    store.upload(local, step)
    if before_commit is not None:
        before_commit()
    store.commit(local, step, metrics)
