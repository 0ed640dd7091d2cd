"""``--eval-every``: held-out retrieval inside the pre-training loop (real DeepSpeed worker, one process).

The figures recorded in the step history and exported as ``soho_eval_recall{direction,k}`` must be the
ones :mod:`orchestration.pretrain.heldout_eval` computes offline on the committed model of the same step."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestration.pretrain.config import RunConfig, parse_run_config

KEYS = [f"eval_{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]


def test_eval_every_needs_the_synthetic_heldout_split() -> None:
    with pytest.raises(ValueError, match="eval_every=5 needs evaluation data; --data 's3://bucket/shards/"
                                         "manifest.json' has no held-out split.*--eval-data"):
        RunConfig.of(eval_every=5, data="s3://bucket/shards/manifest.json")
    with pytest.raises(ValueError, match="eval_candidates=1 must be >= 2"):
        RunConfig.of(eval_every=5, eval_candidates=1)
    with pytest.raises(ValueError, match="eval_every=-1 must be >= 0"):
        RunConfig.of(eval_every=-1)
    cfg = parse_run_config(["--eval-every", "50", "--eval-candidates", "16"])
    assert (cfg.observability.eval_every, cfg.observability.eval_candidates) == (50, 16)
    # off by default: --data runs are unaffected
    assert RunConfig.of(data="x/manifest.json").observability.eval_every == 0


def test_final_eval_is_on_exactly_for_the_embedded_synthetic_data() -> None:
    """--final-eval unset: the held-out evaluation of the final model runs when the data is the synthetic set
    (the demo) and not with --data (no held-out split); forced on with --data it is refused by name."""
    assert parse_run_config([]).run_final_eval is True
    assert parse_run_config(["--data", "x/manifest.json"]).run_final_eval is False
    assert parse_run_config(["--no-final-eval"]).run_final_eval is False
    with pytest.raises(ValueError, match="final_eval needs evaluation data; --data 'x/manifest.json'"):
        parse_run_config(["--final-eval", "--data", "x/manifest.json"])


def test_summary_carries_the_heldout_figures(tmp_path: Path) -> None:
    """summary.json keeps the held-out block (without the temporary model path or the cache settings) and the
    loss-curve PNG is drawn with its accuracy/usage panel."""
    import json

    from orchestration.pretrain.summary import write_run_artifacts

    history = [{"step": s, "loss": 10.0 - s / 10, "mlm": 5.0, "mvm": 4.0, "itm": 0.69 - s / 1000, "itc": 2.0,
                "itm_acc": 0.5 + s / 200, "itc_acc": s / 100, "vd_usage": min(1.0, 0.04 * s),
                "vd_perplexity": 3.0 * s, "samples_per_s": 50.0} for s in range(1, 41)]
    state = {"config": {"run_name": "h", "preset": "tiny", "zero_stage": 2, "precision": "fp32"}, "step": 40,
             "samples_seen": 1280, "world_size": 2, "nonfinite_steps": 0, "resumes": [], "history": history}
    heldout = {"model": "/tmp/gone/final_model", "itm_acc": 0.93, "itm_acc_pos": 0.95, "itm_acc_neg": 0.91,
               "t2i_r1": 31.0, "t2i_r5": 77.0, "t2i_r10": 90.0, "i2t_r1": 29.0, "i2t_r5": 77.0,
               "i2t_r10": 93.0, "num_candidates": 100, "chance_r1": 1.0, "vd_usage_ratio": 1.0,
               "vd_perplexity": 91.1, "vd_dead_codes": 0, "vd_num_codes": 128, "vd_enabled": True,
               "eval_seconds": 20.0, "heldout": {"cache_dir": "/somewhere"}}
    summary = write_run_artifacts(state, None, str(tmp_path), "h", {}, 1.0, heldout=heldout)
    on_disk = json.loads((tmp_path / "h" / "summary.json").read_text())
    want = {k: v for k, v in heldout.items() if k not in ("model", "heldout", "vd_enabled")}
    assert summary["heldout"] == on_disk["heldout"] == want
    assert (tmp_path / "h" / "loss_curve.png").stat().st_size > 10_000
    plain = write_run_artifacts(state, None, str(tmp_path), "p", {}, 1.0)
    assert "heldout" not in plain


@pytest.mark.slow
@pytest.mark.integration
def test_periodic_heldout_eval_in_the_worker_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed as dist

    from orchestration.pretrain.heldout_eval import HeldoutConfig, evaluate_heldout, model_from_checkpoint
    from orchestration.pretrain.launch import ensure_data
    from orchestration.pretrain.worker import _Trainer
    from orchestration.runtime.checkpoint import EXPORT_DIR, StorageStore
    from orchestration.runtime.distributed import destroy_process_group, ensure_process_group
    from soho import SohoForPretraining

    monkeypatch.setenv("SOHO_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("LOCAL_RANK", "0")
    cfg = RunConfig.of(preset="tiny", launcher="local", synthetic_pairs=64, image_size=64, max_text_len=24,
                    micro_batch_size=4, warmup_steps=2, max_steps=6, checkpoint_every=3, keep_checkpoints=2,
                    eval_every=3, eval_candidates=12, metrics_port=-1, log_every=1,
                    storage_path=str(tmp_path / "runs"), run_name="periodic",
                    tensorboard_dir=str(tmp_path / "tb"))
    data_url = ensure_data(cfg)
    created = ensure_process_group(False)
    try:
        store = StorageStore(cfg.checkpoint.storage_path, cfg.name, cfg.checkpoint.keep_checkpoints, rank=0,
                             world_size=1, barrier=dist.barrier)
        trainer = _Trainer(cfg, store, data_url, under_ray=False)
        try:
            result = trainer.run()
            assert trainer.engine.module.training  # evaluation left the model in training mode
            metrics = trainer.metrics
        finally:
            trainer.close()
    finally:
        if created:
            destroy_process_group()

    assert result.step == 6
    evals = {r["step"]: r for r in result.history if "eval_t2i_r1" in r}
    assert sorted(evals) == [3, 6]  # exactly every eval_every steps
    for rec in evals.values():
        assert rec["eval_candidates"] == 12
        for d in ("i2t", "t2i"):
            r1, r5, r10 = (rec[f"eval_{d}_r{k}"] for k in (1, 5, 10))
            assert 0.0 <= r1 <= r5 <= r10 <= 1.0
            assert r10 > 0.0  # 10 of 12 candidates: at least some positive lies in the top 10
        assert 0.0 <= rec["eval_itm_acc"] <= 1.0
        # the same images with the paraphrased captions, scored beside them
        assert 0.0 <= rec["eval_para_itm_acc"] <= 1.0
        for d in ("i2t", "t2i"):
            assert 0.0 <= rec[f"eval_para_{d}_r1"] <= rec[f"eval_para_{d}_r10"] <= 1.0
    # the run's history log (what summary.json and the docs' plots read) holds the same entries
    from orchestration.runtime.checkpoint import read_history

    ckroot = tmp_path / "runs" / "periodic" / "checkpoints"
    history = read_history(str(tmp_path / "runs"), "periodic")
    assert {r["step"]: r for r in history if "eval_t2i_r1" in r} == evals
    # --tensorboard-dir: the step and eval figures as TensorBoard reads them (eval/* at steps 3 and 6)
    from tests.orchestration.test_tensorboard import assert_matches_history

    assert_matches_history(tmp_path / "tb" / "periodic", history)
    # the registry exports the last evaluation, 0..1
    for key in KEYS:
        d, k = key[len("eval_"):].split("_r")
        assert metrics.value("soho_eval_recall", direction=d, k=k) == evals[6][key]
    print("periodic held-out eval:", {s: {k: round(v, 3) for k, v in r.items() if k.startswith("eval_")}
                                      for s, r in evals.items()})
    # The offline evaluator on the models committed at those steps gives the same figures (it reports percent
    # rounded to 0.01): the step-6 fp32 export and the step-3 DeepSpeed checkpoint.
    hcfg = HeldoutConfig.from_run_config(cfg, num_candidates=12)
    for step, model in ((6, SohoForPretraining.from_pretrained(
                             str(ckroot / "checkpoint_step_00000006" / EXPORT_DIR))),
                        (3, model_from_checkpoint(ckroot / "checkpoint_step_00000003"))):
        offline = evaluate_heldout(model, hcfg)
        assert offline["itm_acc"] == evals[step]["eval_itm_acc"], step
        for key in KEYS:
            assert offline[key[len("eval_"):]] == round(evals[step][key] * 100, 2), (step, key)
            name = key[len("eval_"):]
            assert offline["para_" + name] == round(evals[step]["eval_para_" + name] * 100, 2), (step, key)
        assert offline["para_itm_acc"] == evals[step]["eval_para_itm_acc"], step
