"""Checkpoints you can trust, on the real worker loop with a real DeepSpeed engine on CPU (one process, world
1):

* a finite loss with NaN gradients is not stepped (ZeRO-0: our check; ZeRO-2: DeepSpeed's global-norm check),
  is counted in ``soho_train_nonfinite_steps_total`` and aborts after too many in a row;
* non-finite weights are never committed;
* the per-step history lives in the history log: ``train_state.json`` has the same size at step 5 and 15,
  the summary and loss curve still get every step;
* one changed byte (same size) in the newest checkpoint: resume falls back to the previous one and says why;
* a planted pickle, with the records rewritten to match it, never executes: resume falls back, and DeepSpeed's
  own loader refuses it too under :func:`~orchestration.runtime.checkpoint.weights_only_loads`;
* stale staging folders of this run and rank are removed at start, another run's are left alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.orchestration.conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SCRIPT = textwrap.dedent(
    """
    import builtins, json, logging, os, shutil, sys
    from pathlib import Path
    import torch
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from orchestration.runtime.checkpoint import (TRAIN_STATE, StorageStore, Staging, read_history,
                                          rank_record_name, sha256_file, step_dir_name, weights_only_loads)
    from orchestration.pretrain.config import RunConfig
    from orchestration.pretrain.summary import write_run_artifacts
    from orchestration.pretrain.worker import (NonFiniteLossError, NonFiniteWeightsError, _Trainer,
                                      ensure_process_group, unwrap, visual_dictionary)

    data, root, marker = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    ensure_process_group(False)
    out = {}

    def trainer(name, **kw):
        cfg = RunConfig.of(launcher="local", data=data, storage_path=str(root), run_name=name, image_size=64,
                        micro_batch_size=4, max_text_len=24, warmup_steps=0, lr_schedule="constant",
                        metrics_port=-1, **kw)
        return _Trainer(cfg, StorageStore(cfg.checkpoint.storage_path, cfg.name,
                                          cfg.checkpoint.keep_checkpoints), cfg.dataset.data, False)

    def params(t):
        return {n: p.detach().clone() for n, p in unwrap(t.engine).named_parameters()}

    # --- non-finite gradients: ZeRO-0 (our check) and ZeRO-2 (DeepSpeed's) ------------------------------
    for stage in (0, 2):
        t = trainer(f"grad{stage}", zero_stage=stage, max_steps=50, max_consecutive_nonfinite=3,
                    fault_nonfinite_grad_batches=[1, 3, 5, 6, 7])
        t.build(); t.engine.train(); t._it = iter(t.loader)
        r = {}
        assert t.train_step()                          # batch 0: normal
        before = params(t)
        stats = t._micro_step(next(t._it))             # batch 1: finite loss, NaN gradients
        r["loss_finite"] = stats is not None and bool(torch.isfinite(stats).all())
        r["flagged"] = t._grads_skipped
        r["params_unchanged"] = all(torch.equal(p, before[n]) for n, p in params(t).items())
        assert t.train_step()                          # batch 2: normal step
        moved = params(t)
        r["moved_after"] = any(not torch.equal(moved[n], before[n]) for n in moved)
        assert t.train_step()                          # batch 3 skipped (counted), batch 4 makes the step
        r["step"], r["batches"], r["counted"] = t.step, t.batches_seen, t.nonfinite_total
        r["metric"] = t.metrics.value("soho_train_nonfinite_steps_total")
        r["finite"] = all(bool(torch.isfinite(p).all()) for p in params(t).values())
        try:
            t.train_step()                             # batches 5, 6, 7: three in a row
            r["aborted"] = None
        except NonFiniteLossError as exc:
            r["aborted"] = str(exc)
        r["counted_end"] = t.nonfinite_total
        r["backward_allreduce"] = t.engine.enable_backward_allreduce  # one rank: off at ZeRO-0 only
        if stage == 2:                                 # non-finite weights are never committed
            next(unwrap(t.engine).parameters()).data.view(-1)[0] = float("nan")
            try:
                t.save_checkpoint(final=False)
                r["refused"] = None
            except NonFiniteWeightsError as exc:
                r["refused"] = str(exc)
            r["dirs_after_refusal"] = sorted(p.name for p in (root / "grad2").rglob("checkpoint_step_*"))
        out[f"zero{stage}"] = r
        t.close()

    # --- history log, checkpoint size, summary; stale staging folders -------------------------------------
    tmp = Path(os.environ["TMPDIR"])
    mine = Staging(str(root), "hist", 0).new("ckpt-7"); (mine / "junk.pt").write_bytes(b"x" * 10)
    other_run = Staging(str(root), "other", 0).new("ckpt-7")
    other_rank = Staging(str(root), "hist", 1).new("ckpt-7")
    t = trainer("hist", max_steps=15, checkpoint_every=5, keep_checkpoints=3)
    res = t.run(); t.close()
    out["staging"] = {"mine": mine.exists(), "other_run": other_run.exists(),
                      "other_rank": other_rank.exists(),
                      "left": sorted(p.name.rsplit("-", 1)[0] for p in tmp.glob("soho-stage-*"))}
    ck = root / "hist" / "checkpoints"
    out["sizes"] = {s: (ck / step_dir_name(s) / TRAIN_STATE).stat().st_size for s in (5, 10, 15)}
    out["state_has_history"] = "history" in json.loads((ck / step_dir_name(15) / TRAIN_STATE).read_text())
    hist = read_history(str(root), "hist")
    out["history_steps"] = [h["step"] for h in hist]
    out["waits"] = [(h["data_wait_s"], h["step_s"]) for h in hist]
    out["segments"] = sorted(p.name for p in (root / "hist" / "history").iterdir())
    state15 = json.loads((ck / step_dir_name(15) / TRAIN_STATE).read_text())
    summary = write_run_artifacts(state15, None, str(root), "hist", {}, 1.0)
    out["summary_first"] = summary["losses"]["loss"]["first"]
    out["history_first5"] = round(sum(h["loss"] for h in hist[:5]) / 5, 5)
    out["png"] = (root / "hist" / "loss_curve.png").stat().st_size

    # --- one byte changed at the same size in the newest checkpoint -------------------------------------
    shard = sorted((ck / step_dir_name(15) / "ds").glob("*optim_states.pt"))[0]
    raw = bytearray(shard.read_bytes()); raw[len(raw) // 2] ^= 0x01; shard.write_bytes(bytes(raw))
    out["flipped"] = str(shard.relative_to(ck))
    t = trainer("hist", max_steps=16, checkpoint_every=5, keep_checkpoints=3)
    t.build(); t.resume(); out["resumed_after_flip"] = t.step; t.close()
    out["history_after_fallback"] = [h["step"] for h in read_history(str(root), "hist")]

    # --- a planted pickle whose records were rewritten to match ------------------------------------------
    class Planted:
        def __reduce__(self):
            return (builtins.open, (str(marker), "w"))
    d10 = ck / step_dir_name(10)
    target = d10 / "ds" / "mp_rank_00_model_states.pt"
    torch.save({"module": Planted()}, target)
    probe = root / "probe.pt"; shutil.copy(target, probe)
    torch.load(probe, weights_only=False)              # proof that the plant is live under plain pickle
    out["plant_live"] = marker.exists(); marker.unlink()
    rec_path = d10 / rank_record_name(0)
    rec = json.loads(rec_path.read_text())
    rec["files"]["ds/mp_rank_00_model_states.pt"] = {"size": target.stat().st_size,
                                                     "sha256": sha256_file(target)}
    rec_path.write_text(json.dumps(rec))
    t = trainer("hist", max_steps=16, checkpoint_every=5, keep_checkpoints=3)
    t.build(); t.resume(); out["resumed_after_plant"] = t.step
    try:                                               # DeepSpeed's own loader, forced weights-only
        with weights_only_loads():
            t.engine.load_checkpoint(str(d10), tag="ds")
        out["ds_load"] = "loaded"
    except Exception as exc:
        out["ds_load"] = type(exc).__name__
    t.close()
    out["marker_after"] = marker.exists()
    out["cpu_seconds"] = round(__import__("time").process_time(), 1)
    print("RESULT " + json.dumps(out))
    """
)


def test_trusted_checkpoints_nonfinite_grads_history_and_staging(tmp_path: Path, synth_manifest: str) -> None:
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    marker = tmp_path / "PWNED"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, synth_manifest, str(tmp_path / "runs"), str(marker)],
                          cwd=REPO, capture_output=True, text=True, timeout=400,
                          env={**os.environ, "DS_ACCELERATOR": "cpu", "TMPDIR": str(tmpdir)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[len("RESULT "):])
    log = proc.stderr

    for stage in ("zero0", "zero2"):
        r = out[stage]
        assert r["loss_finite"] and r["flagged"] and r["params_unchanged"], (stage, r)
        assert r["moved_after"] and r["finite"], (stage, r)
        assert (r["step"], r["batches"], r["counted"], r["metric"]) == (3, 5, 1, 1.0), (stage, r)
        assert r["aborted"] is not None and (
            "3 consecutive steps had a non-finite loss or non-finite gradients" in r["aborted"]), (stage, r)
        assert r["counted_end"] == 4, (stage, r)
    # one rank has nothing to all-reduce: ZeRO-0 skips DeepSpeed's bucket copy; ZeRO-2 needs that path
    assert (out["zero0"]["backward_allreduce"], out["zero2"]["backward_allreduce"]) == (False, True)
    assert "non-finite gradients (finite loss) at step 3" in log
    assert "not committing a checkpoint with non-finite weights" in out["zero2"]["refused"]
    assert out["zero2"]["dirs_after_refusal"] == []

    assert out["staging"]["mine"] is False  # the killed attempt's leftover of this run and rank: removed
    assert out["staging"]["other_run"] is True and out["staging"]["other_rank"] is True
    assert "removed 1 stale staging folder(s) of this run" in log

    sizes = out["sizes"]
    # no per-step history inside: size independent of the step
    assert abs(sizes["15"] - sizes["5"]) <= 8, sizes
    assert out["state_has_history"] is False
    assert out["history_steps"] == list(range(1, 16))
    # a step's time starts before its first batch is fetched, and that fetch is its data wait
    assert all(0 <= wait <= step for wait, step in out["waits"]), out["waits"]
    assert sum(wait for wait, _ in out["waits"]) > 0, out["waits"]
    assert out["segments"] == ["steps-00000001-00000005.jsonl", "steps-00000006-00000010.jsonl",
                               "steps-00000011-00000015.jsonl"]
    assert out["summary_first"] == out["history_first5"] and out["png"] > 1000

    assert out["resumed_after_flip"] == 10
    assert "ignoring committed checkpoint at step 15" in log
    flip_line = next(ln for ln in log.splitlines() if "ignoring committed checkpoint at step 15" in ln)
    assert (out["flipped"].split("/", 1)[1] in flip_line and "has sha256" in flip_line
            and "expected" in flip_line)
    assert out["history_after_fallback"] == list(range(1, 11))  # the abandoned steps 11-15 are dropped

    assert out["plant_live"] is True  # the planted file runs code under plain pickle ...
    assert out["marker_after"] is False  # ... but never on resume
    assert out["resumed_after_plant"] == 5
    plant_line = next(ln for ln in log.splitlines() if "ignoring committed checkpoint at step 10" in ln)
    assert "mp_rank_00_model_states.pt: refused by the weights-only loader" in plant_line
    assert out["ds_load"] == "UnpicklingError"
