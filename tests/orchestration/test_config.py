"""RunConfig: one dataclass → flags and YAML keys; precedence; validation; DeepSpeed config; lr schedule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import configcli
from orchestration.pretrain.config import RunConfig, build_parser, parse_run_config
from orchestration.runtime.ds_config import build_deepspeed_config
from orchestration.runtime.schedule import (
    apply_lr,
    backbone_frozen,
    backbone_parameter_names,
    lr_factor,
    param_groups,
)


def test_every_field_is_a_flag() -> None:
    flags = {a.option_strings[0] for a in build_parser()._actions if a.option_strings}
    leaves = configcli.leaves(RunConfig)
    # the 60 options of the flat config before the split into sections, + gpu_decode and 3 step options,
    # + init_from and the 6 --eval-data options (eval_data/images/split/max_images/k/exhaustive), + 3
    # caption-augmentation probabilities, + min_workers, + synthetic_captions and caption_choice
    assert len(leaves) == 77
    for leaf in leaves:
        assert leaf.flag in flags, leaf.name
    # the names the k8s manifests use
    for flag in ("--preset", "--data", "--s3-endpoint-url", "--storage-path", "--run-name", "--max-steps",
                 "--epochs", "--checkpoint-every", "--keep-checkpoints", "--num-workers", "--use-gpu",
                 "--zero-stage", "--precision", "--micro-batch-size", "--grad-accum", "--lr", "--backbone-lr",
                 "--weight-decay", "--warmup-steps", "--freeze-backbone-epochs", "--freeze-backbone-steps",
                 "--vd-decay", "--metrics-port", "--seed", "--max-failures", "--loader-workers",
                 "--log-every", "--ray-address", "--fault-kill-after-checkpoint"):
        assert flag in flags, flag


def test_caption_choice_follows_the_synthetic_captions_unless_set() -> None:
    assert RunConfig.of().dataset.caption_mode == "any"  # the embedded default: 5 captions per scene
    assert RunConfig.of(synthetic_captions=1).dataset.caption_mode == "txt"
    assert RunConfig.of(synthetic_captions=5).dataset.caption_mode == "any"
    assert RunConfig.of(synthetic_captions=5, caption_choice="txt").dataset.caption_mode == "txt"
    assert RunConfig.of(caption_choice="any").dataset.caption_mode == "any"  # real shards' json lists
    with pytest.raises(ValueError, match="caption_choice='every'"):
        RunConfig.of(caption_choice="every")
    with pytest.raises(ValueError, match="synthetic_captions"):
        RunConfig.of(synthetic_captions=0)


def test_defaults_are_the_embedded_demo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SOHO_STORAGE_PATH", raising=False)
    cfg = parse_run_config([])
    assert (cfg.preset, cfg.scale.num_workers, cfg.scale.zero_stage, cfg.scale.use_gpu,
            cfg.scale.launcher) == ("tiny", 2, 2, False, "ray")
    assert cfg.checkpoint.storage_path == "./runs" and cfg.name == "soho-tiny" and cfg.dataset.data is None
    assert cfg.observability.metrics_port == 9450 and cfg.faults.max_failures > 0
    assert cfg.dataset.use_resampled is True


def test_yaml_then_flags_win(tmp_path: Path) -> None:
    y = tmp_path / "run.yaml"
    y.write_text("preset: small\nmax-steps: 50\nzero_stage: 3\nprecision: bf16\n"
                 "fault_nonfinite_batches: [3, 4]\nuse_gpu: false\nlr: 2.0e-4\n")
    cfg = parse_run_config(["--config", str(y), "--max-steps", "7", "--lr", "1e-3"])
    assert cfg.preset == "small" and cfg.scale.zero_stage == 3 and cfg.scale.precision == "bf16"
    assert cfg.optim.max_steps == 7 and cfg.optim.lr == pytest.approx(1e-3)  # flags win
    assert cfg.faults.fault_nonfinite_batches == [3, 4]
    assert parse_run_config(["--fault-nonfinite-batches", "1,5"]).faults.fault_nonfinite_batches == [1, 5]
    assert parse_run_config(["--use-gpu", "--precision", "fp16"]).scale.use_gpu is True
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


def test_bad_input_names_the_option(tmp_path: Path) -> None:
    y = tmp_path / "bad.yaml"
    y.write_text("max_step: 5\n")
    with pytest.raises(ValueError, match="max_step"):
        parse_run_config(["--config", str(y)])
    y.write_text("max_steps: many\n")
    with pytest.raises(ValueError, match="max_steps.*many"):
        parse_run_config(["--config", str(y)])
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        parse_run_config(["--config", str(tmp_path / "nope.yaml")])
    with pytest.raises(ValueError, match="checkpoint_every=0"):
        parse_run_config(["--checkpoint-every", "0"])
    with pytest.raises(ValueError, match="fp16"):
        parse_run_config(["--precision", "fp16"])
    with pytest.raises(SystemExit):
        parse_run_config(["--zero-stage", "4"])


@pytest.mark.parametrize("stage,precision", [(0, "fp32"), (2, "fp32"), (3, "bf16"), (1, "fp16")])
def test_deepspeed_config(stage: int, precision: str) -> None:
    cfg = RunConfig.of(zero_stage=stage, precision=precision, micro_batch_size=4, grad_accum=3,
                    use_gpu=precision == "fp16")
    ds = build_deepspeed_config(cfg.scale, cfg.optim, world_size=2)
    assert ds["train_batch_size"] == 4 * 3 * 2
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 3
    assert ds["zero_optimization"]["stage"] == stage
    assert ds.get("bf16", {}).get("enabled", False) == (precision == "bf16")
    assert ds.get("fp16", {}).get("enabled", False) == (precision == "fp16")
    assert "optimizer" not in ds  # our own AdamW with backbone/rest groups


def test_lr_schedule_and_cold_start() -> None:
    cfg = RunConfig.of(max_steps=100, warmup_steps=10, lr_schedule="cosine", min_lr_ratio=0.1,
                    freeze_backbone_steps=5, freeze_backbone_epochs=1, epochs=3)
    assert lr_factor(cfg.optim, 0) == pytest.approx(0.1) and lr_factor(cfg.optim, 9) == pytest.approx(1.0)
    assert lr_factor(cfg.optim, 10) == pytest.approx(1.0)
    assert lr_factor(cfg.optim, 100) == pytest.approx(0.1)
    assert lr_factor(cfg.optim, 55) == pytest.approx(0.1 + 0.9 * 0.5)
    lin = cfg.replace(lr_schedule="linear")
    assert lr_factor(lin.optim, 55) == pytest.approx(0.1 + 0.9 * 0.5)
    assert (backbone_frozen(cfg.optim, 4, 1) and backbone_frozen(cfg.optim, 10, 0)
            and not backbone_frozen(cfg.optim, 5, 1))


def test_param_groups_split_the_resnet_trunk() -> None:
    from soho import SohoForPretraining, soho_tiny

    model = SohoForPretraining(soho_tiny())
    cfg = RunConfig.of(lr=1e-3, backbone_lr=1e-4, weight_decay=0.05, warmup_steps=0, lr_schedule="constant")
    groups, specs = param_groups(model, cfg.optim)
    trunk = backbone_parameter_names(model)
    assert trunk and all(".trunk." in n for n in trunk)
    n_params = sum(1 for _ in model.parameters())
    assert sum(len(g["params"]) for g in groups) == n_params  # every parameter exactly once
    by_name = {(s.name, s.decay): g for s, g in zip(specs, groups, strict=True)}
    assert by_name[("backbone", True)]["lr"] == pytest.approx(1e-4)
    assert by_name[("rest", True)]["lr"] == pytest.approx(1e-3)
    assert by_name[("rest", False)]["weight_decay"] == 0.0 and by_name[("rest", True)]["weight_decay"] == 0.05
    opt = torch.optim.AdamW(groups)
    apply_lr(opt, specs, cfg.optim, step=0, frozen=True)
    for s, g in zip(specs, opt.param_groups, strict=True):
        assert g["lr"] == (0.0 if s.name == "backbone" else pytest.approx(1e-3))
    apply_lr(opt, specs, cfg.optim, step=0, frozen=False)
    assert min(g["lr"] for g in opt.param_groups) == pytest.approx(1e-4)


@pytest.mark.parametrize("name", sorted(p.name for p in
                                         (Path(__file__).resolve().parents[2] / "configs").glob("*.yaml")))
def test_shipped_run_yamls_parse(name: str) -> None:
    path = Path(__file__).resolve().parents[2] / "configs" / name
    cfg = parse_run_config(["--config", str(path)])
    assert cfg.preset in ("tiny", "small", "base")
    if name == "demo.yaml":  # the file documents the embedded default exactly
        defaults = parse_run_config([])
        assert cfg.replace(storage_path=defaults.checkpoint.storage_path) == defaults


def test_epoch_cold_start_on_a_resampled_stream_is_refused() -> None:
    """A resampled stream's epoch never advances: freeze_backbone_epochs would freeze the trunk forever."""
    with pytest.raises(ValueError, match=r"freeze_backbone_epochs=1 .*resampled.*freeze_backbone_steps"):
        RunConfig.from_dict({"freeze_backbone_epochs": 1})
    with pytest.raises(ValueError, match="freeze_backbone_epochs=2 .*--epochs N"):
        parse_run_config(["--freeze-backbone-epochs", "2"])
    # epochs with a forced resampled stream
    with pytest.raises(ValueError, match="epochs needs epoch passes"):
        parse_run_config(["--freeze-backbone-epochs", "2", "--epochs", "4", "--resampled"])
    ok = RunConfig.of(freeze_backbone_epochs=1, epochs=2)  # epoch passes: real epochs
    assert ok.dataset.use_resampled is False and ok.optim.freeze_backbone_epochs == 1
    assert RunConfig.of(freeze_backbone_steps=100).optim.freeze_backbone_steps == 100


@pytest.mark.parametrize("field,value,fix", [
    ("lr", float("nan"), "--lr"), ("lr", float("inf"), "--lr"), ("lr", 0.0, "--lr"), ("lr", 5.0, "--lr"),
    ("backbone_lr", float("nan"), "--backbone-lr"), ("backbone_lr", -1e-3, "--backbone-lr"),
    ("adam_beta1", 1.0, "--adam-beta1"), ("adam_beta1", -0.1, "--adam-beta1"),
    ("adam_beta2", float("nan"), "--adam-beta2"), ("adam_beta2", 1.5, "--adam-beta2"),
    ("adam_eps", 0.0, "--adam-eps"), ("adam_eps", 0.5, "--adam-eps"),
    ("adam_eps", float("inf"), "--adam-eps"),
    ("grad_clip", -1.0, "--grad-clip"), ("grad_clip", float("nan"), "--grad-clip"),
    ("weight_decay", float("inf"), "--weight-decay"), ("weight_decay", 2.0, "--weight-decay"),
    ("backbone_weight_decay", -1e-4, "--backbone-weight-decay"),
])
def test_optimiser_values_out_of_range_are_refused_naming_field_and_fix(field: str, value: float,
                                                                        fix: str) -> None:
    with pytest.raises(ValueError) as err:
        RunConfig.of(**{field: value})
    msg = str(err.value)
    assert f"{field}=" in msg and fix in msg, msg
    # the same through YAML strings and flags (".nan" is YAML's NaN)
    flag = "--" + field.replace("_", "-")
    with pytest.raises(ValueError, match=f"{field}="):
        parse_run_config([flag, repr(value) if value == value else "nan"])


def test_optimiser_values_in_range_pass_and_reach_the_optimizer() -> None:
    cfg = RunConfig.of(lr=1e-4, adam_beta1=0.0, adam_beta2=0.999, adam_eps=1e-6, grad_clip=0.0,
                       weight_decay=0.0, backbone_optimizer="sgd", backbone_lr=1e-2,
                       backbone_weight_decay=1e-4)
    assert (cfg.optim.adam_eps, cfg.optim.backbone_lr) == (1e-6, 1e-2)
    assert RunConfig.of().optim.adam_eps == 1e-8  # torch's AdamW default: unchanged behaviour


def _shipped_configs() -> list[Path]:
    root = Path(__file__).resolve().parents[2]
    return sorted((root / "configs").glob("*.yaml")) + [root / "k8s" / "base" / "run.yaml"]


@pytest.mark.parametrize("path", _shipped_configs(),
                         ids=lambda p: p.name if p.parent.name == "configs" else "k8s-run")
def test_print_config_resolves_every_shipped_config(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--print-config prints the resolved run + model config as JSON and starts nothing; the paper-scale
    recipes start the trunk from torchvision's ImageNet weights and have a cold start that can end."""
    import json

    from orchestration.pretrain.cli import main

    out = main(["--config", str(path), "--print-config"])
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(out))
    run, model, derived = printed["run_config"], printed["model_config"], printed["derived"]
    assert RunConfig.from_dict({k: v for k, v in run.items() if k != "run_name"}) == parse_run_config(
        ["--config", str(path)])
    enc = model["encoder"]
    if run["preset"] == "tiny":  # the CPU recipes: random trunk, no download
        assert enc["backbone"] == "tiny" and enc["weights"] is None and derived["trunk"]["init"] == "random"
    else:  # small/base: ImageNet through torchvision's weights API
        assert enc["weights"] == "IMAGENET1K_V1"
        assert derived["trunk"]["init"].endswith("_Weights.IMAGENET1K_V1")
        assert derived["trunk"]["file"].endswith(Path(derived["trunk"]["url"]).name)
    # a cold start by epochs only with real epochs; otherwise in steps
    assert not (run["freeze_backbone_epochs"] and derived["resampled"])
    assert derived["global_batch_size"] == run["micro_batch_size"] * run["grad_accum"] * run["num_workers"]
    if path.name == "coco_vg.yaml":
        assert (enc["backbone"], model["transformer"]["name_or_path"]) == ("resnet101", "bert-base-uncased")
        assert (run["epochs"], run["freeze_backbone_epochs"], derived["resampled"]) == (40, 10, False)
        assert derived["global_batch_size"] == 512 and model["vd"]["num_codes"] == 2048
    if path.name in ("base-8gpu.yaml", "small-1gpu.yaml"):
        assert run["freeze_backbone_epochs"] == 0 and run["freeze_backbone_steps"] == run["max_steps"] // 4
    if path.name == "synthetic_cpu.yaml":
        assert run["backbone_weights"] == "none" and run["freeze_backbone_steps"] == 50


def test_print_config_process_exits_0_without_ray() -> None:
    """The real entry point in a fresh process: exit 0, JSON on stdout, neither ray nor deepspeed imported."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    code = ("import sys, runpy; "
            "sys.argv = ['soho.train', '--config', 'configs/coco_vg.yaml', '--print-config'];"
            "runpy.run_module('soho.train', run_name='__main__');"
            "print('IMPORTED', 'ray' in sys.modules, 'deepspeed' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    body, _, tail = proc.stdout.rpartition("IMPORTED")
    assert tail.split() == ["False", "False"]
    printed = json.loads(body)
    assert printed["model_config"]["encoder"]["weights"] == "IMAGENET1K_V1"
    assert printed["run_config"]["freeze_backbone_epochs"] == 10
