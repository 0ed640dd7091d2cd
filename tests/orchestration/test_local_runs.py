"""The Ray-free worker loop with real DeepSpeed on CPU: torchrun ranks, ZeRO-3 + bf16, non-finite steps, and a
crash in the middle of a checkpoint (a real SIGKILL) followed by a resume from the previous committed one."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from orchestration.runtime.checkpoint import read_history
from tests.orchestration.conftest import FAST_FLAGS, REPO, last_json, rank_records, run_cli
from tests.orchestration.test_tensorboard import assert_matches_history, event_files, raw_steps

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_zero3_bf16_two_ranks_under_torchrun(tmp_path: Path, synth_manifest: str) -> None:
    """ZeRO-3 in bf16 on 2 torchrun ranks: a few steps, identical fp32 codebooks, fp32 export."""
    from soho import SohoForPretraining, SohoModel

    proc = run_cli([*FAST_FLAGS, "--launcher", "local", "--data", synth_manifest, "--storage-path",
                    str(tmp_path), "--run-name", "z3", "--zero-stage", "3", "--precision", "bf16",
                    "--max-steps", "3", "--checkpoint-every", "3", "--metrics-port", "-1",
                    "--tensorboard-dir", str(tmp_path / "tb")], torchrun_procs=2)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = last_json(proc.stdout)
    assert summary["steps"] == 3 and summary["world_size"] == 2 and summary["zero_stage"] == 3
    ckpt = tmp_path / "z3" / "checkpoints" / "checkpoint_step_00000003"
    recs = rank_records(ckpt)
    assert len(recs) == 2
    for rec in recs:
        assert rec["param_dtype"] == "torch.bfloat16"  # the engine really trains in bf16 ...
        assert rec["vd_buffer_dtypes"]["codebook"] == "torch.float32"  # ... while the VD stays fp32
        assert rec["vd_buffer_dtypes"]["histogram"] == "torch.float32"
    assert recs[0]["vd_codebook_sha256"] == recs[1]["vd_codebook_sha256"]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in read_history(str(tmp_path), "z3"))
    # TensorBoard: one event file (rank 0's; each torchrun rank is its own process) holding the history
    assert len(event_files(tmp_path / "tb" / "z3")) == 1
    assert_matches_history(tmp_path / "tb" / "z3", read_history(str(tmp_path), "z3"))
    # ZeRO-3 shards per rank: both ranks wrote their own parameter partition
    ds_files = sorted(p.name for p in (ckpt / "ds").iterdir())
    assert any("zero_pp_rank_1" in n for n in ds_files), ds_files
    # consolidated fp32 export, loadable without pickle by the model's own API
    export = tmp_path / "z3" / "final_model"
    model = SohoModel.from_pretrained(str(export))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    pre = SohoForPretraining.from_pretrained(str(export))
    from orchestration.runtime.distributed import tensor_sha256

    assert tensor_sha256(pre.soho.visual_dictionary.codebook) == recs[0]["vd_codebook_sha256"]


def test_crash_while_writing_checkpoint_resumes_from_previous(tmp_path: Path, synth_manifest: str) -> None:
    args = [*FAST_FLAGS, "--launcher", "local", "--data", synth_manifest, "--storage-path", str(tmp_path),
            "--run-name", "crash", "--max-steps", "6", "--checkpoint-every", "2", "--zero-stage", "2",
            "--metrics-port", "-1", "--fault-crash-during-checkpoint", "4",
            "--tensorboard-dir", str(tmp_path / "tb")]
    env = {"SOHO_FAULT_DIR": str(tmp_path / "faults")}
    first = run_cli(args, env=env)
    assert first.returncode == -9, first.stdout[-3000:] + first.stderr[-3000:]  # SIGKILLed mid-checkpoint
    ckroot = tmp_path / "crash" / "checkpoints"
    assert (ckroot / "checkpoint_step_00000002" / "COMMITTED").is_file()
    partial = ckroot / "checkpoint_step_00000004"
    assert (partial / "ds").is_dir() and not (partial / "COMMITTED").exists()  # written, never committed

    second = run_cli(args, env=env)  # the same command again
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    log = second.stdout + second.stderr
    assert "ignoring checkpoint at step 4: never committed" in log
    summary = last_json(second.stdout)
    assert summary["steps"] == 6
    assert summary["resumes"] == [{"from_step": 2, "first_step": 3}]
    assert [r["step"] for r in read_history(str(tmp_path), "crash")] == [1, 2, 3, 4, 5, 6]
    # TensorBoard: the killed attempt had flushed steps 1-4 (at its step-4 checkpoint), the resumed one logged
    # 3-6; TensorBoard shows each step once, with the values of the history (the resumed attempt's for 3-6)
    killed, resumed = event_files(tmp_path / "tb" / "crash")
    assert (raw_steps(killed, "loss/total") == [1, 2, 3, 4]
            and raw_steps(resumed, "loss/total") == [3, 4, 5, 6])
    assert_matches_history(tmp_path / "tb" / "crash", read_history(str(tmp_path), "crash"))
    from soho import SohoModel

    assert sum(p.numel() for p in SohoModel.from_pretrained(summary["final_model"]).parameters()) > 0


NONFINITE_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from orchestration.pretrain.config import RunConfig
    from orchestration.runtime.checkpoint import StorageStore
    from orchestration.runtime.schedule import backbone_parameter_names
    from orchestration.runtime.distributed import ensure_process_group, unwrap, visual_dictionary
    from orchestration.pretrain.worker import NonFiniteLossError, _Trainer
    ensure_process_group(False)
    cfg = RunConfig.of(launcher="local", data=sys.argv[1], storage_path=sys.argv[2], image_size=64,
                       micro_batch_size=4, max_text_len=24, max_steps=20, warmup_steps=0,
                       lr_schedule="constant", metrics_port=-1, fault_nonfinite_batches=[1, 3, 4, 5],
                       max_consecutive_nonfinite=3, freeze_backbone_steps=1)
    t = _Trainer(cfg, StorageStore(cfg.checkpoint.storage_path, cfg.name, 2), cfg.dataset.data,
                 under_ray=False)
    t.build(); t.engine.train(); t._it = iter(t.loader)
    out = {}
    trunk = backbone_parameter_names(unwrap(t.engine))
    init = {n: p.detach().clone() for n, p in unwrap(t.engine).named_parameters()}
    assert t.train_step()                                  # batch 0: a normal step, trunk frozen (cold start)
    params = {n: p.detach().clone() for n, p in unwrap(t.engine).named_parameters()}
    out["trunk_frozen_step1"] = all(torch.equal(params[n], init[n]) for n in trunk)
    out["rest_moved_step1"] = any(not torch.equal(params[n], init[n]) for n in params if n not in trunk)
    codebook = visual_dictionary(t.engine).codebook.clone()
    out["skipped"] = t._micro_step(next(t._it)) is None    # batch 1: NaN loss
    out["params_unchanged"] = all(torch.equal(p, params[n]) for n, p in unwrap(t.engine).named_parameters())
    out["codebook_unchanged"] = torch.equal(visual_dictionary(t.engine).codebook, codebook)
    out["counted"] = t.nonfinite_total
    out["metric"] = t.metrics.value("soho_train_nonfinite_steps_total")
    assert t.train_step()                                  # batch 2: finite again, an update happens
    out["params_changed_after"] = any(not torch.equal(p, params[n])
                                      for n, p in unwrap(t.engine).named_parameters())
    out["trunk_moved_after_unfreeze"] = any(not torch.equal(p, params[n])
                                            for n, p in unwrap(t.engine).named_parameters() if n in trunk)
    out["step"] = t.step
    try:
        t.train_step()                                     # batches 3, 4, 5 all NaN: abort after 3 in a row
        out["aborted"] = None
    except NonFiniteLossError as exc:
        out["aborted"] = str(exc)
    out["counted_end"] = t.nonfinite_total
    print("RESULT " + json.dumps(out))
    """
)


def test_cold_start_and_nonfinite_steps_are_skipped_counted_and_abort(tmp_path: Path,
                                                                      synth_manifest: str) -> None:
    proc = subprocess.run([sys.executable, "-c", NONFINITE_SCRIPT, synth_manifest, str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env={**__import__("os").environ,
                                                                              "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    out = json.loads(line[len("RESULT "):])
    assert out["trunk_frozen_step1"] is True and out["rest_moved_step1"] is True  # cold start
    assert out["trunk_moved_after_unfreeze"] is True
    assert out["skipped"] is True
    assert out["params_unchanged"] is True and out["codebook_unchanged"] is True
    assert out["counted"] == 1 and out["metric"] == 1.0
    assert out["params_changed_after"] is True and out["step"] == 2
    assert out["aborted"] is not None and "3 consecutive steps had a non-finite loss" in out["aborted"]
    assert out["counted_end"] == 4
