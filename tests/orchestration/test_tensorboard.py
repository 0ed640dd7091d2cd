"""``--tensorboard-dir`` / ``--wandb-project`` (orchestration.runtime.loggers): event files read back with
TensorBoard's own loader (``EventAccumulator``), a resumed attempt's purge, rank 0 only, a remote (moto S3)
directory, and the error when W&B is asked for without its package.

The runs through the real training loop live beside the runs they extend (one more flag, no extra run):
``test_local_runs.py`` (crash mid-checkpoint + resume; 2 torchrun ranks), ``test_heldout_eval_periodic.py``
(held-out eval figures) and ``test_ray_runs.py`` (S3 storage + relaunch); they check with the helpers here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from orchestration.pretrain.config import RunConfig, parse_run_config
from orchestration.pretrain.worker import open_run_logger
from orchestration.runtime.loggers import RunLogger, wandb_available
from tests.orchestration.conftest import free_port

# history record key -> the tag it must appear under (written out here, not imported: a rename is caught)
STEP_TAGS = {
    "loss/total": "loss", "loss/mlm": "mlm", "loss/mvm": "mvm", "loss/itm": "itm",
    "accuracy/mlm": "mlm_acc", "accuracy/mvm": "mvm_acc", "accuracy/itm": "itm_acc",
    "train/lr": "lr",
    "codebook/usage": "vd_usage", "codebook/perplexity": "vd_perplexity",
    "codebook/dead_codes": "vd_dead_codes",
    "codebook/decay": "vd_decay",
    "throughput/samples_per_s": "samples_per_s", "throughput/step_seconds": "step_s",
    "throughput/data_wait_seconds": "data_wait_s",
}
EVAL_TAGS = {"eval/itm_acc": "eval_itm_acc", "eval/i2t_r1": "eval_i2t_r1", "eval/t2i_r1": "eval_t2i_r1",
             "eval/i2t_r10": "eval_i2t_r10", "eval/t2i_r5": "eval_t2i_r5", "eval/seconds": "eval_seconds",
             "eval/para_itm_acc": "eval_para_itm_acc", "eval/para_t2i_r1": "eval_para_t2i_r1"}


def event_files(log_dir: Path) -> list[Path]:
    return sorted(p for p in Path(log_dir).iterdir() if p.name.startswith("events.out.tfevents."))


def tb_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] as TensorBoard shows them (every event file of the dir, purges applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def raw_steps(event_file: Path, tag: str) -> list[int]:
    """Steps of ``tag`` as written in one event file (no purge: what an attempt really logged)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return [ev.step for ev in EventFileLoader(str(event_file)).Load()
            if ev.HasField("summary") and any(v.tag == tag for v in ev.summary.value)]


def assert_matches_history(log_dir: Path, history: list[dict[str, Any]], *, itc: bool | None = None) -> None:
    """Every step tag holds exactly the history's steps (each once) with the history's values; the eval tags
    hold the evaluated steps. ``itc``: whether the run had the ITC term (None: read it off the history, where
    the ITC loss is 0 exactly when the term is off)."""
    scalars = tb_scalars(log_dir)
    steps = [int(r["step"]) for r in history]
    if itc is None:
        itc = any(float(r.get("itc", 0.0)) != 0.0 for r in history)
    for tag, key in STEP_TAGS.items():
        assert tag in scalars, (tag, sorted(scalars))
        assert [s for s, _ in scalars[tag]] == steps, (tag, scalars[tag])
        assert [v for _, v in scalars[tag]] == pytest.approx([float(r[key]) for r in history],
                                                             rel=1e-6, abs=1e-7), tag
    assert ("loss/itc" in scalars) == itc and ("accuracy/itc" in scalars) == itc
    if itc:
        assert [v for _, v in scalars["loss/itc"]] == pytest.approx([float(r["itc"]) for r in history],
                                                                    rel=1e-6, abs=1e-7)
    evals = [r for r in history if "eval_itm_acc" in r]
    for tag, key in EVAL_TAGS.items():
        if not evals:
            assert tag not in scalars
            continue
        assert [s for s, _ in scalars[tag]] == [r["step"] for r in evals], tag
        assert [v for _, v in scalars[tag]] == pytest.approx([float(r[key]) for r in evals],
                                                             rel=1e-6, abs=1e-7)
    assert "eval/candidates" not in scalars


def _record(step: int, base: float) -> dict[str, float]:
    r = {"step": step, "loss": base + step, "mlm": 1.0 * step, "mvm": 0.5 * step, "itm": 0.69, "itc": 2.0,
         "mlm_acc": 0.1, "mvm_acc": 0.2, "itm_acc": 0.5, "itc_acc": 0.3, "vd_usage": 0.25,
         "vd_perplexity": 3.5, "vd_dead_codes": 7, "vd_decay": 0.99, "lr": 1e-4 * step,
         "samples_per_s": 40.0 + base, "step_s": 0.2, "data_wait_s": 0.01}
    return r


def test_resumed_attempt_purges_the_steps_after_its_checkpoint(tmp_path: Path) -> None:
    """Attempt 1 logs steps 1..4 and dies (its checkpoint: step 2); attempt 2 resumes at 2 and logs 3..5.
    TensorBoard shows 1..5 once each: 1-2 from attempt 1, 3-5 from attempt 2."""
    first = RunLogger(run_name="r", tensorboard_dir=str(tmp_path), start_step=0)
    for s in range(1, 5):
        first.log_step(s, _record(s, 0.0))
    first.log_eval(4, {"eval_itm_acc": 0.5, "eval_t2i_r1": 0.1, "eval_candidates": 12})
    first.flush()  # what a checkpoint does; the process is then killed (its writer never closed)
    second = RunLogger(run_name="r", tensorboard_dir=str(tmp_path), start_step=2)
    for s in range(3, 6):
        second.log_step(s, _record(s, 100.0))
    second.log_eval(4, {"eval_itm_acc": 0.75, "eval_t2i_r1": 0.2, "eval_candidates": 12})
    second.close()
    first.close()

    files = event_files(tmp_path / "r")
    assert len(files) == 2
    assert (raw_steps(files[0], "loss/total") == [1, 2, 3, 4]
            and raw_steps(files[1], "loss/total") == [3, 4, 5])
    got = tb_scalars(tmp_path / "r")
    expected = [_record(1, 0.0), _record(2, 0.0), *(_record(s, 100.0) for s in (3, 4, 5))]
    assert [s for s, _ in got["loss/total"]] == [1, 2, 3, 4, 5]
    assert [v for _, v in got["loss/total"]] == pytest.approx([r["loss"] for r in expected])
    assert [v for _, v in got["throughput/samples_per_s"]] == pytest.approx([40, 40, 140, 140, 140])
    assert got["codebook/dead_codes"] == [(s, 7.0) for s in range(1, 6)]
    assert [v for _, v in got["train/lr"]] == pytest.approx([1e-4 * s for s in range(1, 6)])
    assert got["eval/itm_acc"] == [(4, 0.75)] and got["eval/t2i_r1"] == [(4, pytest.approx(0.2))]
    assert "loss/itc" not in got and "eval/candidates" not in got  # itc off; a constant is not a curve

    with_itc = RunLogger(run_name="itc", tensorboard_dir=str(tmp_path))
    with_itc.log_step(1, _record(1, 0.0), itc=True)
    with_itc.close()
    got = tb_scalars(tmp_path / "itc")
    assert got["loss/itc"] == [(1, 2.0)] and got["accuracy/itc"] == [(1, pytest.approx(0.3))]


def test_only_rank_0_writes_and_off_means_nothing_written(tmp_path: Path) -> None:
    other = RunLogger(run_name="r", rank=1, tensorboard_dir=str(tmp_path / "tb"))
    other.log_step(1, _record(1, 0.0))
    other.flush()
    other.close()
    assert not other.enabled and not (tmp_path / "tb").exists()
    off = RunLogger(run_name="r", rank=0)
    off.log_step(1, _record(1, 0.0))
    off.close()
    assert not off.enabled and off.writer is None and list(tmp_path.iterdir()) == []
    # a file:// URL is a local directory
    local = RunLogger(run_name="f", tensorboard_dir=f"file://{tmp_path}/tb2")
    local.log_step(1, _record(1, 0.0))
    local.close()
    assert tb_scalars(tmp_path / "tb2" / "f")["loss/total"] == [(1, 1.0)]


def test_config_flags_and_the_wandb_error() -> None:
    cfg = parse_run_config(["--tensorboard-dir", "s3://bucket/tb", "--launcher", "local"])
    assert cfg.observability.tensorboard_dir == "s3://bucket/tb" and cfg.observability.wandb_project is None
    assert RunConfig.of().observability.tensorboard_dir is None  # off by default
    with pytest.raises(ValueError, match="tensorboard_dir must not be empty"):
        RunConfig.of(tensorboard_dir=" ")
    # the error below is about a missing package; nothing to check where it is installed
    if wandb_available():
        return
    with pytest.raises(ValueError,
                       match=r"wandb_project='proj' needs the `wandb` package.*pip install wandb"):
        parse_run_config(["--wandb-project", "proj"])
    with pytest.raises(RuntimeError, match=r"needs the `wandb` package"):
        RunLogger(run_name="r", wandb_project="proj")
    assert not RunLogger(run_name="r", rank=1, wandb_project="proj").enabled  # other ranks never log


@pytest.mark.s3
@pytest.mark.integration
def test_remote_dir_is_uploaded_with_fsspec_to_moto_s3(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """An s3:// --tensorboard-dir: events written in a local temp folder, uploaded at flush (checkpoint) and
    close; the bucket holds a TensorBoard-readable dir; an unwritable URL fails at start, naming it."""
    import s3fs
    from moto.server import ThreadedMotoServer

    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(k, "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{server.get_host_and_port()[1]}"
        opts = {"client_kwargs": {"endpoint_url": endpoint}}
        fs = s3fs.S3FileSystem(**opts)
        fs.mkdir("tbbucket")
        cfg = RunConfig.of(launcher="local", run_name="remote", tensorboard_dir="s3://tbbucket/tb",
                        s3_endpoint_url=endpoint, storage_path=str(tmp_path / "runs"))
        log = open_run_logger(cfg, rank=0, start_step=0)  # the worker's constructor (endpoint from cfg)
        local_dir = Path(log.log_dir)
        assert local_dir.is_dir() and not str(local_dir).startswith(str(tmp_path))
        for s in (1, 2):
            log.log_step(s, _record(s, 0.0))
        log.flush()  # a checkpoint: the bucket has steps 1-2 now
        fs.invalidate_cache()
        (remote,) = fs.ls("tbbucket/tb/remote")
        fs.get(remote, str(tmp_path / "dl1" / Path(remote).name))
        assert tb_scalars(tmp_path / "dl1")["loss/total"] == [(1, 1.0), (2, 2.0)]
        log.log_step(3, _record(3, 0.0))
        log.close()
        assert not local_dir.exists()  # the temp folder goes with the run
        fs.invalidate_cache()
        assert [Path(p).name for p in fs.ls("tbbucket/tb/remote")] == [Path(remote).name]
        fs.get("tbbucket/tb/remote/", str(tmp_path / "dl2") + "/", recursive=True)
        assert [s for s, _ in tb_scalars(tmp_path / "dl2")["loss/total"]] == [1, 2, 3]

        with pytest.raises(RuntimeError, match=r"--tensorboard-dir s3://no-such-bucket/tb: cannot write"):
            open_run_logger(cfg.replace(tensorboard_dir="s3://no-such-bucket/tb"), rank=0, start_step=0)
    finally:
        server.stop()
