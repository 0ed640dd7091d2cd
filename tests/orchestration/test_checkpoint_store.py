"""Commit semantics of the checkpoint store, on real local and in-memory fsspec filesystems (no DeepSpeed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from orchestration.checkpoint import (
    COMMITTED,
    TRAIN_STATE,
    IncompleteCheckpointError,
    StorageStore,
    step_dir_name,
    verify_local,
    write_json_atomic,
    write_rank_record,
)


def _make_local_ckpt(root: Path, step: int, world_size: int = 2) -> list[Path]:
    """What each rank writes locally before upload: its 'engine' files, then its record (rank 0 also the state)."""
    dirs = []
    for rank in range(world_size):
        d = root / f"r{rank}-{step}"
        (d / "ds").mkdir(parents=True)
        torch.save({"state": torch.full((10 + rank + step,), float(step))}, d / "ds" / f"zero_pp_rank_{rank}_optim_states.pt")
        if rank == 0:
            torch.save({"module": {"w": torch.ones(5)}}, d / "ds" / "mp_rank_00_model_states.pt")
            write_json_atomic(d / TRAIN_STATE, {"step": step, "world_size": world_size})
        write_rank_record(d, rank, {"loader_state": {"pos": step * 10 + rank}}, already={})
        dirs.append(d)
    return dirs


def _save(store_factory, tmp: Path, step: int, world_size: int = 2) -> None:
    dirs = _make_local_ckpt(tmp, step, world_size)
    stores = [store_factory(rank) for rank in range(world_size)]
    for rank, d in enumerate(dirs):
        stores[rank].upload(d, step)
    # commit is collective; in one process we call rank 1 then rank 0 (barrier is a no-op here)
    for rank in reversed(range(world_size)):
        stores[rank].commit(dirs[rank], step, {"step": step})


@pytest.mark.parametrize("url_kind", ["local", "memory"])
def test_only_committed_complete_checkpoints_are_resumed(tmp_path: Path, url_kind: str) -> None:
    storage = str(tmp_path / "store") if url_kind == "local" else f"memory://soho-test-{tmp_path.name}"

    def factory(rank: int) -> StorageStore:
        return StorageStore(storage, "run", keep=2, rank=rank, world_size=2)

    _save(factory, tmp_path / "stage", step=3)
    _save(factory, tmp_path / "stage", step=6)
    # step 9: every file uploaded, but the process died before COMMITTED (crash during checkpoint)
    dirs = _make_local_ckpt(tmp_path / "stage", 9)
    for rank, d in enumerate(dirs):
        factory(rank).upload(d, 9)
    store = factory(0)
    assert store.committed_steps() == [6, 3]
    latest = store.latest()
    assert latest is not None and latest.state["step"] == 6
    rec = json.loads((latest.path / "rank-00001.json").read_text())
    assert rec["loader_state"] == {"pos": 61}
    latest.cleanup()

    # a committed checkpoint whose shard is truncated is ignored too (falls back to step 3)
    fs, root = store.fs, store.root
    shard = f"{root}/{step_dir_name(6)}/ds/zero_pp_rank_1_optim_states.pt"
    with fs.open(shard, "wb") as fh:
        fh.write(b"short")
    latest = store.latest()
    assert latest is not None and latest.state["step"] == 3
    latest.cleanup()

    # retention: after committing 12, only the newest 2 committed remain and the stale step 9 is removed
    _save(factory, tmp_path / "stage", step=12)
    assert store.committed_steps() == [12, 6]
    assert not fs.exists(f"{root}/{step_dir_name(9)}")
    assert fs.exists(f"{root}/{step_dir_name(12)}/{COMMITTED}")


def test_verify_names_the_missing_rank(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    (d / "ds").mkdir(parents=True)
    write_json_atomic(d / TRAIN_STATE, {"step": 1, "world_size": 2})
    write_rank_record(d, 0, {}, already={})
    with pytest.raises(IncompleteCheckpointError, match="rank 1 never finished"):
        verify_local(d)
    write_rank_record(d, 1, {}, already={})
    assert verify_local(d)["step"] == 1
