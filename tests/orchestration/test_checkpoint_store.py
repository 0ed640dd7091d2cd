"""Commit and trust semantics of the checkpoint store, the history log and staging folders, on real local and
in-memory fsspec filesystems (no DeepSpeed: the real-engine counterpart is test_trusted_checkpoints.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from orchestration.runtime.checkpoint import (
    COMMITTED,
    TRAIN_STATE,
    CorruptCheckpointError,
    HistoryLog,
    IncompleteCheckpointError,
    Staging,
    StorageStore,
    UntrustedCheckpointError,
    check_weights_only,
    ray_fallback_dirs,
    read_history,
    sha256_file,
    step_dir_name,
    verify_local,
    write_json_atomic,
    write_rank_record,
)


def _make_local_ckpt(root: Path, step: int, world_size: int = 2) -> list[Path]:
    """What each rank writes locally before upload: its 'engine' files, then its record (rank 0 also the
    state)."""
    dirs = []
    for rank in range(world_size):
        d = root / f"r{rank}-{step}"
        (d / "ds").mkdir(parents=True)
        torch.save({"state": torch.full((10 + rank + step,), float(step))},
                   d / "ds" / f"zero_pp_rank_{rank}_optim_states.pt")
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


class _Planted:
    """Unpickling this creates a marker file: stands for any code an attacker wants run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


def _storage(tmp_path: Path, url_kind: str) -> str:
    return str(tmp_path / "store") if url_kind == "local" else f"memory://soho-test-{tmp_path.name}"


@pytest.mark.parametrize("url_kind", ["local", "memory"])
def test_changed_byte_at_same_size_falls_back_and_says_why(tmp_path: Path, url_kind: str,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    def factory(rank: int) -> StorageStore:
        return StorageStore(_storage(tmp_path, url_kind), "run", keep=3, rank=rank, world_size=2,
                            staging=Staging(str(tmp_path), "run", rank, root=str(tmp_path / "tmp")))

    _save(factory, tmp_path / "stage", step=3)
    _save(factory, tmp_path / "stage", step=6)
    store = factory(0)
    rel = "ds/zero_pp_rank_1_optim_states.pt"
    path = f"{store.root}/{step_dir_name(6)}/{rel}"
    raw = bytearray(store.fs.cat_file(path))
    raw[-30] ^= 0x01
    store.fs.pipe_file(path, bytes(raw))
    expected = json.loads(store.fs.cat_file(f"{store.root}/{step_dir_name(6)}/rank-00001.json"))["files"][rel]
    assert expected["size"] == len(raw)  # same size: only the digest can tell
    latest = store.latest()
    assert latest is not None and latest.state["step"] == 3
    latest.cleanup()
    why = next(r.getMessage() for r in caplog.records if "step 6" in r.getMessage())
    assert rel in why and f"expected {expected['sha256']}" in why
    assert "has sha256 " + hashlib.sha256(bytes(raw)).hexdigest() in why
    if url_kind == "memory":  # downloaded copies went to this run's staging folder and were removed
        assert list((tmp_path / "tmp").iterdir()) == []


def test_planted_pickle_with_rewritten_records_never_runs(tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    def factory(rank: int) -> StorageStore:
        return StorageStore(str(tmp_path / "store"), "run", keep=3, rank=rank, world_size=2)

    _save(factory, tmp_path / "stage", step=3)
    _save(factory, tmp_path / "stage", step=6)
    marker = tmp_path / "PWNED"
    ck6 = Path(factory(0).root) / step_dir_name(6)
    rel = "ds/mp_rank_00_model_states.pt"
    torch.save({"module": _Planted(marker)}, ck6 / rel)
    record = json.loads((ck6 / "rank-00000.json").read_text())
    record["files"][rel] = {"size": (ck6 / rel).stat().st_size, "sha256": sha256_file(ck6 / rel)}
    (ck6 / "rank-00000.json").write_text(json.dumps(record))
    latest = factory(0).latest()
    assert not marker.exists()
    assert latest is not None and latest.state["step"] == 3
    why = next(r.getMessage() for r in caplog.records if "step 6" in r.getMessage())
    assert f"{rel}: refused by the weights-only loader" in why and "never code" in why
    with pytest.raises(UntrustedCheckpointError, match="refused by the weights-only loader"):
        check_weights_only(ck6 / rel)
    assert not marker.exists()
    # an extra file nobody listed is refused as well, before anything is loaded
    (ck6 / rel).unlink()
    _save(factory, tmp_path / "stage2", step=9)
    ck9 = Path(factory(0).root) / step_dir_name(9)
    torch.save({"x": torch.ones(1)}, ck9 / "ds" / "extra_states.pt")
    with pytest.raises(CorruptCheckpointError,
                       match=r"\['ds/extra_states.pt'\] are listed in no rank record"):
        verify_local(ck9)


def test_ranks_fall_back_together(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    def factory(rank: int) -> StorageStore:
        return StorageStore(str(tmp_path / "store"), "run", keep=3, rank=rank, world_size=2)

    _save(factory, tmp_path / "stage", step=3)
    _save(factory, tmp_path / "stage", step=6)
    votes: list[bool] = []

    def agree(ok: bool) -> bool:  # this rank verified step 6, another rank could not
        votes.append(ok)
        return ok and len(votes) > 1

    latest = factory(0).latest(agree=agree)
    assert latest is not None and latest.state["step"] == 3 and votes == [True, True]
    assert any("another rank could not verify it" in r.getMessage() for r in caplog.records)


def test_ray_fallback_dirs_only_registered_older_checkpoints() -> None:
    names = [step_dir_name(s) for s in (2, 4, 6, 8)] + ["checkpoint_manager_snapshot.json", ".tmp_x"]
    snapshot = json.dumps({"checkpoints": [step_dir_name(4), step_dir_name(6), step_dir_name(8)]})
    assert ray_fallback_dirs(names, 8, snapshot) == [(6, step_dir_name(6)), (4, step_dir_name(4))]
    assert ray_fallback_dirs(names, 6, None) == [(4, step_dir_name(4)), (2, step_dir_name(2))]


@pytest.mark.parametrize("url_kind", ["local", "memory"])
def test_history_log_appends_segments_reads_and_drops_abandoned_steps(tmp_path: Path, url_kind: str) -> None:
    log = HistoryLog.for_run(_storage(tmp_path, url_kind), "run")
    log.append([{"step": s, "loss": 10.0 - s} for s in range(1, 6)])
    log.append([{"step": s, "loss": 10.0 - s} for s in range(6, 11)])
    log.append([])  # nothing to add: no segment
    assert [s[:2] for s in log.segments()] == [(1, 5), (6, 10)]
    assert [r["step"] for r in log.read()] == list(range(1, 11))
    assert [r["step"] for r in log.read(upto=7)] == list(range(1, 8))
    # resumed from step 5 (step 10 was refused): the abandoned 6..10 go, the replay writes them again
    assert len(log.truncate_after(5)) == 1
    log.append([{"step": s, "loss": 0.5} for s in range(6, 9)])
    hist = read_history(_storage(tmp_path, url_kind), "run")
    assert [r["step"] for r in hist] == list(range(1, 9)) and hist[-1]["loss"] == 0.5


def test_staging_removes_only_this_runs_and_ranks_leftovers(tmp_path: Path) -> None:
    tmp = str(tmp_path / "tmp")
    mine = Staging("/data/runs", "exp", 0, root=tmp)
    leftovers = [mine.new("ckpt-80"), mine.new("resume-40")]
    (leftovers[0] / "ds").mkdir()
    keep = [Staging("/data/runs", "exp", 1, root=tmp).new("ckpt-80"),      # another rank (same node)
            Staging("/data/runs", "exp2", 0, root=tmp).new("ckpt-80"),     # another run
            Staging("/other/runs", "exp", 0, root=tmp).new("ckpt-80")]     # same name, other storage
    assert sorted(mine.remove_stale()) == sorted(p.name for p in leftovers)
    assert not any(p.exists() for p in leftovers) and all(p.exists() for p in keep)
    assert mine.remove_stale() == []
