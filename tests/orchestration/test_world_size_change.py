"""Resume on another number of workers: 2 workers -> 5 steps -> 1 worker -> 5 more, and 1 -> 2, with real
DeepSpeed on CPU/gloo (ZeRO-2 bf16 with the paper's SGD+AdamW groups; ZeRO-3 fp32 in epoch mode).

Each switch is checked three ways: the resumed CLI run starts at step 5 and ends at 10 with a continuous loss;
a checkpoint of the new world written right after the re-partitioning (``_Trainer.build`` + ``resume``, the
worker's own code, before any step) consolidates to exactly the old world's full fp32 weights, every
optimiser state (moments, SGD momentum, step counts) and the visual dictionary; and the codebook's checksum
is the one saved with the checkpoint. Plus a fast unit test of the consolidation arithmetic itself."""

from __future__ import annotations

import json
import math
import os
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch

from orchestration.runtime.checkpoint import read_history, read_rank_record
from orchestration.runtime.distributed import tensor_sha256
from orchestration.runtime.reshard import (
    FP32,
    Piece,
    ShardedCheckpoint,
    assemble,
    assemble_range,
    zero3_pieces,
    zero12_pieces,
)
from tests.orchestration.conftest import FAST_FLAGS, PY, REPO, free_port, last_json, run_cli

CODEBOOK = "soho.visual_dictionary.codebook"

# The worker's own build + resume on the new world, then a DeepSpeed checkpoint of the engine before any step.
DUMP_SCRIPT = textwrap.dedent("""
    import json, logging, os, sys
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    logging.basicConfig(level=logging.INFO)
    import torch.distributed as dist
    from orchestration.pretrain.config import RunConfig
    from orchestration.pretrain.worker import _Trainer
    from orchestration.runtime.checkpoint import StorageStore
    from orchestration.runtime.distributed import destroy_process_group, ensure_process_group

    storage, name, data, out = sys.argv[1:5]
    ckpts = sorted(p.path for p in os.scandir(f"{storage}/{name}/checkpoints") if p.is_dir())
    state = json.load(open(f"{ckpts[-1]}/train_state.json"))
    cfg = RunConfig.from_dict(state["config"])
    ensure_process_group(False)
    store = StorageStore(storage, name, 3, rank=dist.get_rank(), world_size=dist.get_world_size(),
                         barrier=dist.barrier)
    trainer = _Trainer(cfg, store, data, under_ray=False)
    trainer.build()
    trainer.resume()
    trainer.engine.save_checkpoint(out, tag="ds")
    if dist.get_rank() == 0:
        print(json.dumps({"step": trainer.step, "world_size": trainer.world_size,
                          "resumes": trainer.resumes, "global_steps": trainer.engine.global_steps}))
    trainer.close()
    destroy_process_group()
""")


# --- the pure arithmetic (no processes, no DeepSpeed) ------------------------------------------------------
def _zero12_layout(shapes: list[int], world: int, align: int) -> tuple[list[torch.Tensor], list[dict]]:
    """Partition params the way ZeRO-1/2 do: back to back (each start aligned to ``align``), cut into
    ``world`` equal partitions; returns each rank's flat partition and its slice mappings."""
    offsets, pos = [], 0
    for n in shapes:
        offsets.append(pos)
        pos += math.ceil(n / align) * align
    total = math.ceil(pos / world) * world
    flat = torch.full((total,), float("nan"))
    values = [torch.arange(n, dtype=torch.float32) + 1000 * i for i, n in enumerate(shapes)]
    for off, v in zip(offsets, values, strict=True):
        flat[off:off + v.numel()] = v
    part = total // world
    parts, mappings = [], []
    for r in range(world):
        lo, hi = r * part, (r + 1) * part
        parts.append(flat[lo:hi].clone())
        m = {}
        for i, (off, n) in enumerate(zip(offsets, shapes, strict=True)):
            s, e = max(lo, off), min(hi, off + n)
            if s < e:
                m[f"p{i}"] = (s - lo, e - s)
        mappings.append(m)
    return parts, mappings


def test_consolidation_arithmetic_zero12_and_zero3() -> None:
    """Pieces from ZeRO-1/2 slice mappings and from ZeRO-3's even split put every element back in place,
    for world sizes that do and do not divide the parameter sizes; a part reads only what it needs."""
    shapes = [7, 1, 30, 5, 64]
    for world in (1, 2, 3, 5):
        parts, mappings = _zero12_layout(shapes, world, align=4)
        pieces = zero12_pieces([[m] for m in mappings])  # one param group
        for i, n in enumerate(shapes):
            full = assemble(pieces[f"p{i}"], lambda r, g, parts=parts: parts[r], (n,))
            assert torch.equal(full, torch.arange(n, dtype=torch.float32) + 1000 * i), (world, i)
        # ZeRO-3: each param cut into `world` parts of ceil(n / world), padded, back to back per rank
        z3 = zero3_pieces([{f"p{i}": (n,) for i, n in enumerate(shapes)}], world)
        flats = []
        for r in range(world):
            chunks = []
            for i, n in enumerate(shapes):
                k = math.ceil(n / world)
                v = torch.arange(n, dtype=torch.float32) + 1000 * i
                chunk = torch.full((k,), float("nan"))
                got = v[r * k:(r + 1) * k]
                chunk[:got.numel()] = got
                chunks.append(chunk)
            flats.append(torch.cat(chunks))
        for i, n in enumerate(shapes):
            want = torch.arange(n, dtype=torch.float32) + 1000 * i
            def flat(r: int, g: int, flats: list[torch.Tensor] = flats) -> torch.Tensor:
                return flats[r]

            assert torch.equal(assemble(z3[f"p{i}"], flat, (n,)), want), (world, i)
            for start, length in ((0, n), (n // 3, n - n // 3), (n - 1, 1), (n // 2, 0)):
                assert torch.equal(assemble_range(z3[f"p{i}"], flat, start, length),
                                   want[start:start + length])
    # a 2-D parameter keeps its shape; pieces that do not add up are refused
    assert assemble([Piece(0, 0, 0, 6)], lambda r, g: torch.arange(6.0), (2, 3)).shape == (2, 3)
    with pytest.raises(RuntimeError, match="hold 5 elements"):
        assemble([Piece(0, 0, 0, 5)], lambda r, g: torch.arange(6.0), (2, 3))


# --- real runs -------------------------------------------------------------------------------------------
def _dump(storage: Path, name: str, data: str, out: Path, procs: int) -> dict:
    """``DUMP_SCRIPT`` on ``procs`` ranks (torchrun when > 1)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DS_ACCELERATOR": "cpu"}
    script = out.parent / "dump.py"
    script.write_text(DUMP_SCRIPT)
    args = [str(script), str(storage), name, data, str(out)]
    cmd = ([PY, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), *args] if procs > 1 else [PY, *args])
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    assert f"re-partitioning for {procs}" in proc.stderr + proc.stdout
    return last_json(proc.stdout)


def _switch(tmp_path: Path, data: str, name: str, before: int, after: int, extra: list[str]) -> None:
    storage = tmp_path / "runs"
    common = [*FAST_FLAGS, "--launcher", "local", "--data", data, "--storage-path", str(storage),
              "--run-name", name, "--checkpoint-every", "5", "--metrics-port", "-1", *extra]
    first = run_cli([*common, "--max-steps", "5"], torchrun_procs=before if before > 1 else 0)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    ckpt = storage / name / "checkpoints" / "checkpoint_step_00000005"
    assert json.loads((ckpt / "train_state.json").read_text())["world_size"] == before

    # the new world's engine right after re-partitioning, before any step: the same full state, exactly
    dumped = _dump(storage, name, data, tmp_path / "dump", after)
    assert dumped["step"] == 5 and dumped["world_size"] == after and dumped["global_steps"] == 5
    old = ShardedCheckpoint.open(ckpt / "ds", before)
    new = ShardedCheckpoint.open(tmp_path / "dump" / "ds", after)
    old_full, new_full = old.full_state(), new.full_state()
    assert sorted(old_full) == sorted(new_full) and len(old_full) > 50
    keys = set()
    for pname, tensors in old_full.items():
        assert sorted(tensors) == sorted(new_full[pname]), pname
        for key, value in tensors.items():
            keys.add(key)
            got = new_full[pname][key]
            if value is None:
                assert got is None, (pname, key)
            else:
                assert torch.equal(got, value), (pname, key)  # exact, every element
    steps = {float(t["step"]) for t in new_full.values()}
    assert steps == {5.0}, steps  # every optimizer group continues at step 5
    assert {FP32, "exp_avg", "exp_avg_sq", "step"} <= keys
    assert sorted(old.buffers) == sorted(new.buffers)
    for bname, buf in old.buffers.items():
        assert torch.equal(new.buffers[bname], buf), bname  # codebook, EMA statistics, BatchNorm stats
    saved_sha = read_rank_record(ckpt, 0)["vd_codebook_sha256"]
    assert tensor_sha256(new.buffers[CODEBOOK]) == saved_sha

    second = run_cli([*common, "--max-steps", "10"], torchrun_procs=after if after > 1 else 0)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    log = second.stdout + second.stderr
    assert f"checkpoint step 5 was written by {before} workers; re-partitioning for {after}" in log
    summary = last_json(second.stdout)
    assert summary["steps"] == 10 and summary["world_size"] == after
    assert summary["resumes"] == [{"from_step": 5, "first_step": 6, "from_world_size": before,
                                   "world_size": after}]
    history = read_history(str(storage), name)
    assert [r["step"] for r in history] == list(range(1, 11))
    # Loss continuity. MLM/MVM are drawn per sample (a 4-sample micro-batch can hold no masked token, so the
    # total jumps between ~2 and ~15 from step to step here); ITM + ITC is computed on every sample. Bound:
    # the first step after the switch lies within the first run's range widened by that range on each side.
    per_step = [r["itm"] + r["itc"] for r in history]
    lo, hi = min(per_step[:5]), max(per_step[:5])
    spread = hi - lo
    assert lo - spread <= per_step[5] <= hi + spread, (per_step, lo, hi)
    assert all(math.isfinite(r["loss"]) for r in history)
    final = ShardedCheckpoint.open(storage / name / "checkpoints" / "checkpoint_step_00000010" / "ds", after)
    assert {float(t["step"]) for t in final.full_state().values()} == {10.0}  # the step count continued


@pytest.mark.slow
@pytest.mark.integration
def test_two_workers_to_one_zero2_bf16_hybrid_optimizer(tmp_path: Path, synth_manifest: str) -> None:
    """ZeRO-2 bf16 with the paper's SGD trunk + AdamW rest: 2 workers for 5 steps, then 1 worker to 10."""
    _switch(tmp_path, synth_manifest, "w21", 2, 1,
            ["--zero-stage", "2", "--precision", "bf16", "--backbone-optimizer", "sgd"])


@pytest.mark.slow
@pytest.mark.integration
def test_one_worker_to_two_zero3_fp32_epoch_mode(tmp_path: Path, synth_manifest: str) -> None:
    """ZeRO-3 fp32 in epoch mode: 1 worker for 5 steps, then 2 workers to 10 (the pass carried over)."""
    _switch(tmp_path, synth_manifest, "w12", 1, 2,
            ["--zero-stage", "3", "--precision", "fp32", "--epochs", "3"])


def test_min_workers_is_ray_train_elastic_range(tmp_path: Path) -> None:
    """--min-workers N becomes Ray Train V2's elastic ScalingConfig(num_workers=(N, --num-workers)) for
    pre-training (whose checkpoints resume on any count); a job that cannot re-partition refuses it, and the
    config refuses a range without Ray or outside 0..num_workers."""
    from orchestration.runtime.config import ScaleConfig
    from orchestration.runtime.ray_launch import build_torch_trainer

    def trainer(scale: ScaleConfig, elastic: bool):  # noqa: ANN202 - a Ray TorchTrainer
        return build_torch_trainer(lambda c: None, {}, scale, name="x", storage_path=str(tmp_path),
                                   elastic=elastic)

    sc = trainer(ScaleConfig(num_workers=3, min_workers=1), elastic=True).scaling_config
    assert sc.num_workers == (1, 3) and sc.elasticity_enabled and (sc.min_workers, sc.max_workers) == (1, 3)
    fixed = trainer(ScaleConfig(num_workers=3), elastic=True).scaling_config
    assert fixed.num_workers == 3 and not fixed.elasticity_enabled
    with pytest.raises(ValueError, match="drop --min-workers"):
        trainer(ScaleConfig(num_workers=3, min_workers=2), elastic=False)  # e.g. fine-tuning
    with pytest.raises(ValueError, match="min_workers=4 must be between 0"):
        ScaleConfig(num_workers=3, min_workers=4)
    with pytest.raises(ValueError, match="needs --launcher ray"):
        ScaleConfig(num_workers=2, min_workers=1, launcher="local")


class _Planted:
    """Unpickling this would run code (create a file); the weights-only loader must refuse it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (Path(self.marker),))


def test_reading_old_partitions_never_unpickles_code(tmp_path: Path) -> None:
    """The conversion reads the old ranks' files weights-only: a planted pickle is refused, its code never
    runs (the resume's verification refuses such a file even earlier; this is the second line)."""
    import pickle

    ds = tmp_path / "ds"
    ds.mkdir()
    marker = tmp_path / "pwned"
    torch.save({"optimizer_state_dict": _Planted(str(marker))},
               ds / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(pickle.UnpicklingError):
        ShardedCheckpoint.open(ds, 1)
    assert not marker.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RuntimeError, match="optimizer partition of rank 0"):  # a missing file is named
        ShardedCheckpoint.open(empty, 2)
