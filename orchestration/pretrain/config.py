"""`RunConfig`: the one source of truth for a training run.

Every field is at the same time a command-line flag (``--max-steps``) and a YAML key (``max_steps`` or
``max-steps``); ``--config run.yaml`` loads a file and flags given on the command line win over it.
Nothing else in orchestration defines options, so the CLI, the YAML files in ``configs/``, the Ray
launcher and the k8s manifests can never drift apart.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

import configcli
from configcli import opt
from data_pipeline.storage import refuse_secret_flags
from orchestration.runtime.config import (
    CheckpointConfig,
    DatasetConfig,
    FaultConfig,
    ObservabilityConfig,
    OptimConfig,
    ScaleConfig,
    need,
)
from soho import SohoConfig, get_preset
from soho.config import normalise_weights, weights_is_path
from soho.encoder import cache_file, torchvision_weights

PRESETS = ("tiny", "small", "base")

# The embedded demo's model recipe on top of the tiny preset: what configs/synthetic_cpu.yaml learned at
# demo scale (why each one: the comments of configs/demo.yaml). Pass --model-overrides '' for the preset as
# is.
DEMO_MODEL_OVERRIDES = (
    "vd.restart_dead_codes=true",
    "vd.dead_code_window=20",
    "vd.decay_warmup_steps=100",
    "pretrain.mvm_prob=0.3",
    "transformer.hidden_dropout=0.0",
    "transformer.attention_dropout=0.0",
    "transformer.initializer_range=0.02",
    "pretrain.itm_interaction=true",
    "pretrain.itc_weight=1.0",
    "vd.transformer_input=features",
)


@dataclass
class RunConfig:
    """All options of ``python -m soho.train``; the defaults are the embedded demo run.

    The model and the seed are top-level; everything else lives in the runtime's typed sections
    (:mod:`orchestration.runtime.config`). Flags and YAML keys are the flat leaf names (``--lr``), built by
    :mod:`configcli`; ``RunConfig.of(lr=1e-4)`` builds one from flat names in Python."""

    preset: str = field(default="tiny", metadata=opt("model preset", choices=PRESETS))
    backbone_weights: str | None = field(
        default=None,
        metadata=opt("initial weights of the ResNet trunk: imagenet (torchvision's IMAGENET1K_V1 through its "
                      "weights API, as the paper; cached in $TORCH_HOME/hub/checkpoints, downloaded when "
                      "missing), another torchvision weights name (IMAGENET1K_V2), a local state-dict file "
                      "(.pt/.pth/.safetensors), or none (random init: offline machines, the CPU recipes); "
                      "default: the preset's (small/base: imagenet; tiny: none, its trunk is not a "
                      "torchvision ResNet)"),
    )
    vd_decay: float | None = field(default=None,
                                   metadata=opt("visual dictionary EMA decay (default: preset's)"))
    model_overrides: list[str] = field(
        default_factory=lambda: list(DEMO_MODEL_OVERRIDES),
        metadata=opt("model config changes on top of the preset: comma-separated section.key=value, e.g. "
                      "vd.restart_dead_codes=true,pretrain.mvm_prob=0.3 (sections/keys of soho.SohoConfig; "
                      "vd.enabled=false,pretrain.mvm_prob=0 is the no-visual-dictionary ablation); default: "
                      "the demo's tiny-scale recipe (ITC term, ITM interaction head, dead-code restart, no "
                      "dropout); '' = the preset as is"),
    )
    init_from: str | None = field(
        default=None,
        metadata=opt("warm start: begin a NEW run (step 0, fresh optimiser and schedule) with the model and "
                      "visual dictionary (codebook and EMA buffers) of an export directory "
                      "(SohoForPretraining.save_pretrained, e.g. runs/x/final_model) or a committed "
                      "checkpoint_step_N directory (its export/, else its DeepSpeed ZeRO files consolidated "
                      "to fp32); local path or fsspec URL (s3://: --s3-endpoint-url and the AWS env). The "
                      "model config must match (keys that change no tensor may differ: dropout, VD decay "
                      "and restarts, masking probabilities, ...). A relaunch of a run that has its own "
                      "committed checkpoint resumes it and ignores this"),
    )
    seed: int = field(default=0, metadata=opt("seed of model init, masking and data order"))
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    observability: ObservabilityConfig = field(default_factory=ObservabilityConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)

    def __post_init__(self) -> None:
        self.validate()

    # --- derived ----------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.checkpoint.run_name or f"soho-{self.preset}"

    @property
    def run_final_eval(self) -> bool:
        """--final-eval as resolved: unset means on exactly when there is held-out data, i.e. --eval-data is
        given or the data is the embedded synthetic set (its held-out split)."""
        final = self.observability.final_eval
        return self.has_heldout_data if final is None else final

    @property
    def has_heldout_data(self) -> bool:
        """An evaluation set exists: --eval-data, or the embedded synthetic data's held-out split."""
        return self.observability.eval_data is not None or self.dataset.data is None

    def storage_options(self) -> dict[str, Any]:
        """fsspec options for s3:// URLs (endpoint from the flag, credentials from the AWS env)."""
        return self.dataset.storage_options()

    def model_config(self) -> SohoConfig:
        """The ``soho.SohoConfig`` this run trains: the preset, then ``backbone_weights``, ``vd_decay`` and
        ``model_overrides`` (in that order: an override wins)."""
        model_cfg = get_preset(self.preset)
        if self.backbone_weights is not None:
            model_cfg.encoder.weights = normalise_weights(self.backbone_weights)
        if self.vd_decay is not None:
            model_cfg.vd.decay = self.vd_decay
        return apply_model_overrides(model_cfg, self.model_overrides)

    def validate(self) -> None:
        """What spans sections (each section checked its own values when it was built)."""
        need(self.preset in PRESETS, f"preset={self.preset!r} must be one of {PRESETS}")
        need(self.optim.max_steps >= 1, f"max_steps={self.optim.max_steps!r} must be >= 1")
        need(self.vd_decay is None or (math.isfinite(self.vd_decay) and 0.0 < self.vd_decay < 1.0),
             f"vd_decay={self.vd_decay!r} must be in (0, 1)")
        try:  # the preset + backbone_weights + overrides: fail at parse time, not after the workers started
            enc = self.model_config().encoder
            # A file is checked where the model is built (it may exist only on the workers); a name here.
            if enc.weights is not None and enc.backbone != "tiny" and not weights_is_path(enc.weights):
                torchvision_weights(enc.backbone, enc.weights)  # a name torchvision knows for this ResNet
        except (TypeError, ValueError) as exc:
            raise ValueError(f"invalid run config: {exc}") from exc
        opt_, data = self.optim, self.dataset
        need(not (opt_.freeze_backbone_epochs and data.use_resampled),
             f"freeze_backbone_epochs={opt_.freeze_backbone_epochs} counts loader epochs, but this run "
             "reads a resampled stream (the default without --epochs), whose epoch never advances: the "
             "ResNet trunk would stay frozen (learning rate 0) for the whole run. Give the cold start in "
             "steps instead, freeze_backbone_steps = epochs x pairs / global batch "
             "(--freeze-backbone-steps), or train in epoch passes with --epochs N")
        need(not (data.gpu_decode and not self.scale.use_gpu),
             "--gpu-decode needs --use-gpu: it decodes the JPEGs with torchvision.io.decode_jpeg on the "
             "training worker's CUDA device (nvjpeg); without a GPU the loader decodes them "
             "(drop --gpu-decode)")
        obs = self.observability
        no_heldout = (f"--data {data.data!r} has no held-out split (only the embedded synthetic data has "
                      "one): give a Karpathy-format retrieval split with --eval-data JSON --eval-images DIR, "
                      "or drop --data")
        need(not (obs.final_eval and not self.has_heldout_data),
             f"final_eval needs evaluation data; {no_heldout}")
        need(obs.eval_every == 0 or self.has_heldout_data,
             f"eval_every={obs.eval_every} needs evaluation data; {no_heldout}, or set --eval-every 0")
        if obs.eval_data is not None and not obs.eval_exhaustive:
            need(self.model_config().pretrain.itc_weight > 0,
                 "--eval-data's fast path ranks by the ITC embeddings (prefilter, then ITM re-rank), and "
                 "this model has no ITC projection (pretrain.itc_weight=0): add --eval-exhaustive (ITM on "
                 "every pair) or train with the ITC term (--model-overrides pretrain.itc_weight=1.0)")
        need(self.init_from is None or bool(self.init_from.strip()),
             "init_from must not be empty (omit --init-from)")

    # --- serialisation ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The flat ``{option: value}`` form (the YAML keys; what checkpoints and summaries record)."""
        return configcli.to_flat(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "config") -> RunConfig:
        """From flat options (``max_steps`` or ``max-steps``); unknown keys are refused by name."""
        return configcli.from_flat(cls, d, source=source)

    @classmethod
    def of(cls, **options: Any) -> RunConfig:
        """``RunConfig.of(lr=1e-4, max_steps=10)``: the defaults with these flat options."""
        return cls.from_dict(options, source="RunConfig.of")

    def replace(self, **options: Any) -> RunConfig:
        """A copy with these flat options changed (validated again)."""
        return self.from_dict({**self.to_dict(), **options}, source="RunConfig.replace")


def apply_model_overrides(model_cfg: SohoConfig, overrides: list[str]) -> SohoConfig:
    """A new ``soho.SohoConfig``: ``model_cfg`` with each ``section.key=value`` applied (the value is parsed
    as YAML: ``true``, ``256``, ``0.3``); validated by ``SohoConfig.from_dict``."""
    d = model_cfg.to_dict()
    for item in overrides:
        key, sep, raw = str(item).partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot:
            raise ValueError(f"model_overrides: {item!r} is not section.key=value (e.g. vd.num_codes=256)")
        if section not in d or name not in d[section]:
            raise ValueError(f"model_overrides: {item!r} names no SohoConfig field; sections: {sorted(d)}")
        d[section][name] = yaml.safe_load(raw)
    try:
        return SohoConfig.from_dict(d)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"model_overrides {overrides!r}: {exc}") from exc


def build_parser() -> argparse.ArgumentParser:
    """argparse flags generated from the RunConfig leaves (defaults suppressed so we can tell what the
    user typed: flags win over the YAML file, the YAML file over the dataclass defaults)."""
    parser = argparse.ArgumentParser(
        prog="python -m soho.train",
        description="SOHO pre-training on Ray Train + DeepSpeed ZeRO. With no arguments: the embedded "
                    "demo (tiny preset, synthetic data, 2 local CPU workers).",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", type=Path, help="YAML file with any of the options below (flags win)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved run config and model config as JSON and exit (no training)")
    configcli.add_flags(parser, RunConfig)
    refuse_secret_flags(parser)  # --s3-secret-key & co.: a clear error naming the AWS_* variable to use
    return parser


def parse_run_config(argv: list[str] | None = None) -> RunConfig:
    """Dataclass defaults < YAML file (``--config``) < command-line flags."""
    return parse_cli(argv)[0]


def parse_cli(argv: list[str] | None = None) -> tuple[RunConfig, bool]:
    """(run config, whether ``--print-config`` was given)."""
    cfg, extra = configcli.parse(RunConfig, build_parser(), argv)
    return cfg, bool(extra.get("print_config", False))


def resolved_config(cfg: RunConfig) -> dict[str, Any]:
    """What ``--print-config`` prints: the run config, the model config the workers build, and what follows
    from them (batch sizes, stream kind, the cold start, where the trunk's initial weights come from)."""
    model_cfg = cfg.model_config()
    enc = model_cfg.encoder
    trunk: dict[str, Any] = {"backbone": enc.backbone, "weights": enc.weights}
    if enc.weights is None:
        trunk["init"] = "random"
    elif weights_is_path(enc.weights) or Path(enc.weights).is_file():
        trunk.update(init="state-dict file", file=enc.weights, present=Path(enc.weights).is_file())
    else:
        w = torchvision_weights(enc.backbone, enc.weights)
        path = cache_file(w)
        trunk.update(init=f"torchvision {type(w).__name__}.{w.name}", url=w.url, file=str(path),
                     cached=path.is_file())
    return {
        "run_config": {**cfg.to_dict(), "run_name": cfg.name},
        "model_config": model_cfg.to_dict(),
        "derived": {
            "global_batch_size": cfg.scale.global_batch_size,
            "resampled": cfg.dataset.use_resampled,
            "cold_start": {"freeze_backbone_steps": cfg.optim.freeze_backbone_steps,
                           "freeze_backbone_epochs": cfg.optim.freeze_backbone_epochs,
                           "epochs": ("real loader epochs, agreed across ranks"
                                      if cfg.optim.freeze_backbone_epochs else None)},
            "trunk": trunk if cfg.init_from is None else {"init": f"warm start from {cfg.init_from}"},
            "init_from": cfg.init_from,
        },
    }
