"""``--init-from`` (warm start from an export or a committed checkpoint) and ``--eval-data`` (ITM accuracy
and zero-shot retrieval on a Karpathy-format split every ``--eval-every`` steps), with real DeepSpeed (ZeRO-2,
CPU) runs of the tiny preset. The evaluation split is the synthetic data's Karpathy-format retrieval split
(``data_pipeline.synth.make_synthetic``, the ``synth_manifest`` fixture's data)."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from orchestration.pretrain.config import RunConfig
from orchestration.pretrain.data_eval import subset_indices
from orchestration.pretrain.init_from import InitFromError, config_differences, load_source, state_sha256
from orchestration.runtime.checkpoint import deepspeed_safe_globals, read_history
from orchestration.runtime.distributed import tensor_sha256
from soho import SohoForPretraining, SohoModel, get_preset
from tests.orchestration.conftest import FAST_FLAGS, last_json, run_cli

KEYS = [f"eval_{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]
CODEBOOK = "soho.visual_dictionary.codebook"
EVAL_POOL = {"eval_max_images": 12, "eval_k": 4}  # 12 images, 60 captions: ~0.4k ITM passes per evaluation


def eval_data(manifest: str) -> tuple[str, str]:
    """(Karpathy JSON, image root) of the synthetic data beside ``manifest``."""
    root = Path(manifest).parent.parent / "downstream"
    return str(root / "retrieval" / "dataset_synth.json"), str(root)


def eval_flags(manifest: str) -> list[str]:
    js, images = eval_data(manifest)
    return ["--eval-data", js, "--eval-images", images,
            "--eval-max-images", str(EVAL_POOL["eval_max_images"]), "--eval-k", str(EVAL_POOL["eval_k"])]


def optimizer_steps(ckpt: Path) -> set[int]:
    """AdamW's step count of every parameter group in rank 0's ZeRO-2/3 optimizer file (read weights-only)."""
    (path,) = sorted((ckpt / "ds").glob("zero_pp_rank_0_*optim_states.pt"))
    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        opt = torch.load(path, map_location="cpu", weights_only=True)["optimizer_state_dict"]
    base = opt["base_optimizer_state"] if "base_optimizer_state" in opt else opt["optimizer_state_dict"]
    return {int(s["step"]) for s in base["state"].values()}


# --- config and pure functions --------------------------------------------------------------------------
def test_eval_data_config_replaces_the_synthetic_heldout_requirement() -> None:
    data = "s3://bucket/shards/manifest.json"
    cfg = RunConfig.of(eval_every=5, data=data, eval_data="s3://b/dataset_coco.json", eval_images="s3://b/coco")
    assert cfg.run_final_eval is True  # --eval-data given: the final model is evaluated on it by default
    assert RunConfig.of(data=data).run_final_eval is False
    with pytest.raises(ValueError, match="eval_every=5 needs evaluation data.*--eval-data JSON --eval-imag"):
        RunConfig.of(eval_every=5, data=data)
    with pytest.raises(ValueError, match="eval_data='x.json' needs --eval-images DIR"):
        RunConfig.of(eval_data="x.json")
    with pytest.raises(ValueError, match="eval_max_images=10 only applies to --eval-data"):
        RunConfig.of(eval_max_images=10)
    with pytest.raises(ValueError, match="eval_max_images=1 must be >= 2"):
        RunConfig.of(eval_data="x.json", eval_images="d", eval_max_images=1)
    # the fast path ranks by ITC embeddings: a model without the ITC projection needs --eval-exhaustive
    with pytest.raises(ValueError, match="no ITC projection.*--eval-exhaustive"):
        RunConfig.of(eval_data="x.json", eval_images="d", model_overrides=[])
    assert RunConfig.of(eval_data="x.json", eval_images="d", model_overrides=[], eval_exhaustive=True)


def test_eval_subset_is_fixed_and_in_split_order() -> None:
    first = subset_indices(5000, 1000)
    assert first == subset_indices(5000, 1000) and first == sorted(first) and len(set(first)) == 1000
    assert first != list(range(1000))  # spread over the split, not its head
    assert subset_indices(8, None) == subset_indices(8, 8) == list(range(8))


def test_model_config_keys_that_may_differ() -> None:
    tiny = get_preset("tiny").to_dict()
    changed = json.loads(json.dumps(tiny))
    changed["vd"]["decay"] = 0.5
    changed["transformer"]["hidden_dropout"] = 0.0
    changed["pretrain"]["mvm_prob"] = 0.3
    assert config_differences(tiny, changed) == []  # no tensor changes
    with_itc = json.loads(json.dumps(tiny))
    with_itc["pretrain"]["itc_weight"] = 1.0
    other_itc = json.loads(json.dumps(with_itc))
    other_itc["pretrain"]["itc_weight"] = 0.5
    assert config_differences(with_itc, other_itc) == []  # the ITC projection exists in both
    assert config_differences(tiny, with_itc) == ["pretrain.itc_weight: source 0.0, this run 1.0"]
    diffs = config_differences(tiny, get_preset("small").to_dict())
    assert "encoder.backbone: source 'tiny', this run 'resnet18'" in diffs
    assert any(d.startswith("transformer.hidden_size:") for d in diffs)


def test_init_from_refuses_what_is_not_a_pretraining_source(tmp_path: Path) -> None:
    """Mismatched preset (through the CLI, before any worker starts), a bare backbone, an unrelated folder;
    and a remote (fsspec) export is downloaded and read like a local one."""
    from orchestration.pretrain.cli import main

    torch.manual_seed(0)
    model = SohoForPretraining(RunConfig().model_config(), load_pretrained=False)
    export = tmp_path / "export"
    model.save_pretrained(export)
    with pytest.raises(InitFromError, match=r"differs from this run's in \d+ key\(s\).*encoder.backbone: "
                                            r"source 'tiny', this run 'resnet18'.*transformer.hidden_size"):
        main(["--init-from", str(export), "--preset", "small", "--backbone-weights", "none"])
    with pytest.raises(InitFromError, match=r"vd.num_codes: source 128, this run 64"):
        main(["--init-from", str(export), "--model-overrides", "vd.num_codes=64,pretrain.itc_weight=1.0,"
                                                               "pretrain.itm_interaction=true"])
    SohoModel(get_preset("tiny"), load_pretrained=False).save_pretrained(tmp_path / "bare")
    with pytest.raises(InitFromError, match="holds a 'SohoModel', not a pre-training export"):
        load_source(str(tmp_path / "bare"), {}, None)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(InitFromError, match=r"neither an export .* it holds \['notes.txt'\]"):
        load_source(str(tmp_path / "other"), {}, None)
    import fsspec

    mem = fsspec.filesystem("memory")
    for f in export.iterdir():
        mem.pipe_file(f"/exports/tiny/{f.name}", f.read_bytes())
    source = load_source("memory://exports/tiny", {}, None)
    assert source.kind == "export"
    assert state_sha256(source.state_dict) == state_sha256(model.state_dict())


# --- real runs ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def source_run(synth_manifest: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """4 steps of the tiny preset (ZeRO-2, one in-process rank) with --eval-every 2 on the Karpathy split,
    checkpoints at steps 2 (DeepSpeed files only) and 4 (with export/); /metrics scraped before it stops."""
    import torch.distributed as dist

    from orchestration.pretrain.worker import _Trainer
    from orchestration.runtime.checkpoint import StorageStore
    from orchestration.runtime.distributed import destroy_process_group, ensure_process_group

    tmp = tmp_path_factory.mktemp("source")
    js, images = eval_data(synth_manifest)
    cfg = RunConfig.of(preset="tiny", launcher="local", data=synth_manifest, image_size=64, max_text_len=24,
                       micro_batch_size=4, warmup_steps=2, max_steps=4, checkpoint_every=2,
                       keep_checkpoints=2, eval_every=2, eval_data=js, eval_images=images, metrics_port=0,
                       log_every=1, storage_path=str(tmp / "runs"), run_name="src", **EVAL_POOL)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOCAL_RANK", "0")
        created = ensure_process_group(False)
        try:
            store = StorageStore(cfg.checkpoint.storage_path, cfg.name, cfg.checkpoint.keep_checkpoints,
                                 rank=0, world_size=1, barrier=dist.barrier)
            trainer = _Trainer(cfg, store, synth_manifest, under_ray=False)
            try:
                result = trainer.run()
                url = f"http://127.0.0.1:{trainer.metrics_port}/metrics"
                with urllib.request.urlopen(url, timeout=10) as resp:
                    scraped = resp.read().decode()
            finally:
                trainer.close()
        finally:
            if created:
                destroy_process_group()
    return {"cfg": cfg, "result": result, "metrics": scraped, "manifest": synth_manifest,
            "ckroot": tmp / "runs" / "src" / "checkpoints", "history": read_history(str(tmp / "runs"), "src")}


@pytest.mark.slow
@pytest.mark.integration
def test_eval_data_every_eval_step_recorded_exported_and_reproducible(source_run: dict[str, Any]) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from orchestration.pretrain.data_eval import evaluate_pool, history_fields, load_pool, model_from_source

    cfg, history = source_run["cfg"], source_run["history"]
    evals = {r["step"]: r for r in history if "eval_itm_acc" in r}
    assert sorted(evals) == [2, 4]  # exactly every --eval-every steps, in the run's history log
    assert {r["step"]: r for r in source_run["result"].history if "eval_itm_acc" in r} == evals
    for rec in evals.values():
        assert (rec["eval_candidates"], rec["eval_texts"]) == (12, 60)  # --eval-max-images 12, 5 captions
        for d in ("i2t", "t2i"):
            r1, r5, r10 = (rec[f"eval_{d}_r{k}"] for k in (1, 5, 10))
            assert 0.0 <= r1 <= r5 <= r10 <= 1.0
        assert 0.0 <= rec["eval_itm_acc"] <= 1.0 and rec["eval_seconds"] > 0
        assert 0 < rec["eval_pairs_scored"] < 12 * 60  # the fast path scores fewer pairs than exhaustive
    # /metrics of the running worker: the last evaluation's figures
    samples = {(s.name, s.labels.get("direction"), s.labels.get("k")): s.value
               for fam in text_string_to_metric_families(source_run["metrics"]) for s in fam.samples}
    for key in KEYS:
        d, k = key[len("eval_"):].split("_r")
        assert samples[("soho_eval_recall", d, k)] == pytest.approx(evals[4][key], abs=1e-9)
    assert samples[("soho_eval_itm_accuracy", None, None)] == pytest.approx(evals[4]["eval_itm_acc"])
    assert samples[("soho_eval_seconds", None, None)] == pytest.approx(evals[4]["eval_seconds"], abs=1e-3)
    # The same function offline on the weights committed at those steps gives the same figures: the step-4
    # export, and the step-2 checkpoint's ZeRO-2 files consolidated to fp32.
    pool = load_pool(cfg)
    ckroot = source_run["ckroot"]
    for step, path in ((4, ckroot / "checkpoint_step_00000004" / "export"),
                       (2, ckroot / "checkpoint_step_00000002")):
        offline = history_fields(evaluate_pool(model_from_source(str(path), cfg), cfg, pool))
        for key, value in offline.items():
            assert value == pytest.approx(evals[step][key], abs=1e-6), (step, key)
    print("eval-data figures:", {s: {k: round(v, 3) for k, v in r.items() if k.startswith("eval_")}
                                 for s, r in evals.items()})


@pytest.mark.slow
@pytest.mark.integration
def test_init_from_export_starts_a_fresh_run_and_a_relaunch_resumes(source_run: dict[str, Any],
                                                                      tmp_path: Path) -> None:
    manifest, ckroot = source_run["manifest"], source_run["ckroot"]
    export = ckroot / "checkpoint_step_00000004" / "export"
    args = [*FAST_FLAGS, "--launcher", "local", "--data", manifest, "--checkpoint-every", "2", "--init-from",
            str(export), "--eval-every", "2", *eval_flags(manifest), "--metrics-port", "-1",
            "--storage-path", str(tmp_path), "--run-name", "warm"]
    out = run_cli([*args, "--max-steps", "2"])
    assert out.returncode == 0, out.stderr[-3000:]
    summary = last_json(out.stdout)
    source = load_file(str(export / "model.safetensors"))
    rec = summary["init_from"]
    assert (rec["kind"], rec["source"], rec["source_step"]) == ("export", str(export), None)
    # the run's fp32 weights and codebook at step 0 are the source's (read here from the safetensors file)
    assert rec["weights_sha256"] == rec["source_sha256"] == state_sha256(source)
    assert rec["codebook_sha256"] == tensor_sha256(source[CODEBOOK])
    src_record = json.loads((ckroot / "checkpoint_step_00000004" / "rank-00000.json").read_text())
    assert rec["codebook_sha256"] == src_record["vd_codebook_sha256"]
    # a new run: step 0, fresh optimiser (AdamW step count 2, the source's is 4) and lr schedule
    assert (summary["steps"], summary["resumes"]) == (2, [])
    ck = tmp_path / "warm" / "checkpoints" / "checkpoint_step_00000002"
    assert optimizer_steps(ck) == {2}
    assert optimizer_steps(ckroot / "checkpoint_step_00000004") == {4}
    history = read_history(str(tmp_path), "warm")
    assert [r["step"] for r in history] == [1, 2]
    assert history[0]["lr"] == source_run["history"][0]["lr"]  # the warm-up starts over
    state = json.loads((ck / "train_state.json").read_text())
    assert state["init_from"] == rec and state["step"] == 2
    # --eval-data in a warm-started run: every eval step in the summary, the final model evaluated too
    assert [e["step"] for e in summary["evals"]] == [2]
    assert all(0.0 <= summary["evals"][0][k] <= 1.0 for k in KEYS)
    assert summary["heldout"]["source"]["eval_data"] == eval_data(manifest)[0]
    assert summary["heldout"]["num_candidates"] == 12
    # relaunch of the warm-started run: its own checkpoint wins, the source is not loaded again
    again = run_cli([*args, "--max-steps", "3", "--no-final-eval"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"--init-from {export} ignored: run warm has its own committed checkpoint" in again.stderr
    resumed = last_json(again.stdout)
    assert resumed["steps"] == 3 and resumed["resumes"] == [{"from_step": 2, "first_step": 3}]
    assert resumed["init_from"] == rec  # the run still says where it started from


@pytest.mark.slow
@pytest.mark.integration
def test_init_from_a_zero2_checkpoint_into_two_zero3_ranks(source_run: dict[str, Any],
                                                           tmp_path: Path) -> None:
    """A checkpoint without export (1 rank, ZeRO-2) warm-starts a run of another shape (2 torchrun ranks,
    ZeRO-3), whose --eval-data evaluation needs the fp32 weights gathered from both ranks."""
    ck = source_run["ckroot"] / "checkpoint_step_00000002"
    assert not (ck / "export").exists()
    manifest = source_run["manifest"]
    out = run_cli([*FAST_FLAGS, "--launcher", "local", "--data", manifest, "--max-steps", "1",
                   "--zero-stage", "3", "--init-from", str(ck), "--eval-every", "1", *eval_flags(manifest),
                   "--metrics-port", "-1", "--storage-path", str(tmp_path), "--run-name", "from-ckpt"],
                  torchrun_procs=2)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = last_json(out.stdout)
    rec = summary["init_from"]
    assert (rec["kind"], rec["source_step"], summary["steps"], summary["world_size"]) == (
        "checkpoint-zero", 2, 1, 2)
    # An fp32 ZeRO-2 run's module weights are its fp32 masters: read them here without zero_to_fp32. What
    # the 2-rank ZeRO-3 engine holds at step 0 (gathered) is exactly that.
    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        module = torch.load(ck / "ds" / "mp_rank_00_model_states.pt", map_location="cpu",
                            weights_only=True)["module"]
    assert rec["weights_sha256"] == rec["source_sha256"] == state_sha256(module)
    assert rec["codebook_sha256"] == json.loads((ck / "rank-00000.json").read_text())["vd_codebook_sha256"]
    assert optimizer_steps(tmp_path / "from-ckpt" / "checkpoints" / "checkpoint_step_00000001") == {1}
    (evaluated,) = summary["evals"]
    assert evaluated["step"] == 1 and evaluated["eval_candidates"] == 12
    assert all(0.0 <= evaluated[k] <= 1.0 for k in KEYS)
