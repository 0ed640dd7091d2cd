"""``--eval-every``: held-out retrieval inside the pre-training loop (real DeepSpeed worker, one process).

The figures recorded in the step history and exported as ``soho_eval_recall{direction,k}`` must be the
ones :mod:`orchestration.heldout_eval` computes offline on the committed model of the same step."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestration.config import RunConfig, parse_run_config

KEYS = [f"eval_{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]


def test_eval_every_needs_the_synthetic_heldout_split() -> None:
    with pytest.raises(ValueError, match="eval_every=5 needs the embedded synthetic data"):
        RunConfig(eval_every=5, data="s3://bucket/shards/manifest.json")
    with pytest.raises(ValueError, match="eval_candidates=1 must be >= 2"):
        RunConfig(eval_every=5, eval_candidates=1)
    with pytest.raises(ValueError, match="eval_every=-1 must be >= 0"):
        RunConfig(eval_every=-1)
    cfg = parse_run_config(["--eval-every", "50", "--eval-candidates", "16"])
    assert (cfg.eval_every, cfg.eval_candidates) == (50, 16)
    assert RunConfig(data="x/manifest.json").eval_every == 0  # off by default: --data runs are unaffected


@pytest.mark.slow
@pytest.mark.integration
def test_periodic_heldout_eval_in_the_worker_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed as dist

    from orchestration.checkpoint import EXPORT_DIR, StorageStore
    from orchestration.heldout_eval import HeldoutConfig, evaluate_model, model_from_checkpoint
    from orchestration.launch import ensure_data
    from orchestration.worker import _Trainer, destroy_process_group, ensure_process_group
    from soho import SohoForPretraining

    monkeypatch.setenv("SOHO_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("LOCAL_RANK", "0")
    cfg = RunConfig(preset="tiny", launcher="local", synthetic_pairs=64, image_size=64, max_text_len=24,
                    micro_batch_size=4, warmup_steps=2, max_steps=6, checkpoint_every=3, keep_checkpoints=2,
                    eval_every=3, eval_candidates=12, metrics_port=-1, log_every=1,
                    storage_path=str(tmp_path / "runs"), run_name="periodic", tensorboard_dir=str(tmp_path / "tb"))
    data_url = ensure_data(cfg)
    created = ensure_process_group(False)
    try:
        store = StorageStore(cfg.storage_path, cfg.name, cfg.keep_checkpoints, rank=0, world_size=1,
                             barrier=dist.barrier)
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
    # the run's history log (what summary.json and the docs' plots read) holds the same entries
    from orchestration.checkpoint import read_history

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
    for step, model in ((6, SohoForPretraining.from_pretrained(str(ckroot / "checkpoint_step_00000006" / EXPORT_DIR))),
                        (3, model_from_checkpoint(ckroot / "checkpoint_step_00000003"))):
        offline = evaluate_model(model, hcfg)
        assert offline["itm_acc"] == evals[step]["eval_itm_acc"], step
        for key in KEYS:
            assert offline[key[len("eval_"):]] == round(evals[step][key] * 100, 2), (step, key)
