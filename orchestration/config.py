"""`RunConfig`: the one source of truth for a training run.

Every field is at the same time a command-line flag (``--max-steps``) and a YAML key (``max_steps`` or
``max-steps``); ``--config run.yaml`` loads a file and flags given on the command line win over it.
Nothing else in orchestration defines options, so the CLI, the YAML files in ``configs/``, the Ray
launcher and the k8s manifests can never drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from data_pipeline.storage import refuse_secret_flags
from orchestration.metrics import DEFAULT_METRICS_PORT

PRESETS = ("tiny", "small", "base")
PRECISIONS = ("fp32", "bf16", "fp16")
LR_SCHEDULES = ("cosine", "linear", "constant", "step")
BACKBONE_OPTIMIZERS = ("adamw", "sgd")
LAUNCHERS = ("ray", "local")

# Bump when the synthetic generator's output changes, so an old cache is never reused silently.
SYNTHETIC_CACHE_VERSION = 1

# The embedded demo's model recipe on top of the tiny preset: what configs/synthetic_cpu.yaml learned at
# demo scale (why each one: the comments of configs/demo.yaml). Pass --model-overrides '' for the preset as is.
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
)


def default_cache_dir() -> Path:
    """Local cache for the embedded synthetic data: ``$SOHO_CACHE_DIR`` or ``~/.cache/soho``."""
    return Path(os.environ.get("SOHO_CACHE_DIR") or Path.home() / ".cache" / "soho")


def _opt(help: str, **extra: Any) -> dict[str, Any]:
    return {"help": help, **extra}


@dataclass
class RunConfig:
    """All options of ``python -m soho.train``; the defaults are the embedded demo run."""

    # --- model and data -------------------------------------------------------------------------
    preset: str = field(default="tiny", metadata=_opt("model preset", choices=PRESETS))
    backbone_weights: str | None = field(
        default=None,
        metadata=_opt("initial weights of the ResNet trunk: imagenet (torchvision's IMAGENET1K_V1 through its "
                      "weights API, as the paper; cached in $TORCH_HOME/hub/checkpoints, downloaded when missing), "
                      "another torchvision weights name (IMAGENET1K_V2), a local state-dict file "
                      "(.pt/.pth/.safetensors), or none (random init: offline machines, the CPU recipes); "
                      "default: the preset's (small/base: imagenet; tiny: none, its trunk is not a torchvision "
                      "ResNet)"),
    )
    data: str | None = field(
        default=None,
        metadata=_opt(
            "training shards: manifest.json URL, brace pattern 'dir/shards-{000000..000009}.tar' or a "
            "comma-separated list; default: synthetic shards made on first use in $SOHO_CACHE_DIR "
            "(~/.cache/soho)"
        ),
    )
    synthetic_pairs: int = field(
        default=4096, metadata=_opt("pairs generated for the default synthetic data (when --data is unset)")
    )
    image_size: int = field(
        default=64, metadata=_opt("longest image side fed to the model (the loader resizes down to it)")
    )
    max_text_len: int = field(default=48, metadata=_opt("tokens per caption incl. [CLS]/[SEP]"))
    s3_endpoint_url: str | None = field(
        default=None, metadata=_opt("S3 endpoint for s3:// data and storage (e.g. MinIO); default: AWS env")
    )
    # --- run and storage ------------------------------------------------------------------------
    storage_path: str = field(
        default_factory=lambda: os.environ.get("SOHO_STORAGE_PATH", "./runs"),
        metadata=_opt("where checkpoints, export and summary go: local path or s3://bucket/prefix "
                      "(default $SOHO_STORAGE_PATH or ./runs)"),
    )
    run_name: str | None = field(
        default=None,
        metadata=_opt("run name under the storage path; relaunching with the same name resumes "
                      "(default soho-<preset>)"),
    )
    max_steps: int = field(default=360, metadata=_opt("optimizer steps to train in total"))
    epochs: int | None = field(
        default=None, metadata=_opt("stop after this many loader epochs (non-resampled data) if earlier")
    )
    checkpoint_every: int = field(default=120, metadata=_opt("checkpoint every N optimizer steps"))
    keep_checkpoints: int = field(default=2, metadata=_opt("committed checkpoints kept in storage"))
    # --- scale ------------------------------------------------------------------------------------
    launcher: str = field(
        default="ray",
        metadata=_opt("ray: Ray Train TorchTrainer; local: this process (or torchrun/deepspeed "
                      "launcher ranks from the env)", choices=LAUNCHERS),
    )
    ray_address: str | None = field(
        default=None, metadata=_opt("Ray cluster to join; default $RAY_ADDRESS, a `ray start` cluster, or a new local one")
    )
    num_workers: int = field(default=2, metadata=_opt("training workers (one per GPU, or CPU processes)"))
    cpus_per_worker: int = field(default=1, metadata=_opt("CPU cores reserved per Ray worker"))
    use_gpu: bool = field(default=False, metadata=_opt("one GPU per worker, NCCL"))
    zero_stage: int = field(default=2, metadata=_opt("DeepSpeed ZeRO stage", choices=(0, 1, 2, 3)))
    precision: str = field(default="fp32", metadata=_opt("training precision", choices=PRECISIONS))
    micro_batch_size: int = field(default=16, metadata=_opt("pairs per worker per micro step"))
    grad_accum: int = field(default=1, metadata=_opt("micro steps per optimizer step"))
    # --- optimisation -------------------------------------------------------------------------------
    lr: float = field(default=1e-3, metadata=_opt("peak learning rate of everything but the ResNet trunk"))
    backbone_lr: float | None = field(
        default=None, metadata=_opt("peak learning rate of the ResNet trunk (default: --lr)")
    )
    weight_decay: float = field(default=0.01, metadata=_opt("AdamW weight decay (not on biases/norms)"))
    backbone_optimizer: str = field(
        default="adamw",
        metadata=_opt("optimizer of the ResNet trunk: adamw (one AdamW for everything) or sgd (the paper: SGD with "
                      "momentum for the trunk, AdamW for the rest, in one hybrid optimizer)",
                      choices=BACKBONE_OPTIMIZERS),
    )
    backbone_momentum: float = field(default=0.9, metadata=_opt("--backbone-optimizer sgd: SGD momentum"))
    backbone_weight_decay: float | None = field(
        default=None,
        metadata=_opt("weight decay of the ResNet trunk (not on biases/norms); with sgd it is added to the "
                      "gradient as torch.optim.SGD does (paper: 1e-4); default: --weight-decay"),
    )
    adam_beta1: float = field(default=0.9, metadata=_opt("AdamW beta1"))
    adam_beta2: float = field(default=0.98, metadata=_opt("AdamW beta2"))
    adam_eps: float = field(default=1e-8, metadata=_opt("AdamW epsilon (added to the root of the second moment)"))
    grad_clip: float = field(default=1.0, metadata=_opt("gradient norm clip (0 = off)"))
    warmup_steps: int = field(default=50, metadata=_opt("linear learning-rate warm-up steps"))
    lr_schedule: str = field(
        default="cosine",
        metadata=_opt("decay after warm-up: cosine/linear to --min-lr-ratio, constant, or step (x --lr-step-gamma "
                      "at each of --lr-milestones)", choices=LR_SCHEDULES),
    )
    min_lr_ratio: float = field(default=0.1, metadata=_opt("final lr as a fraction of the peak"))
    lr_milestones: list[int] = field(
        default_factory=list,
        metadata=_opt("--lr-schedule step: comma-separated optimizer steps (increasing, > 0) from which the lr is "
                      "multiplied by --lr-step-gamma once more each (0-based step index, as torch's MultiStepLR)"),
    )
    lr_step_gamma: float = field(default=0.1, metadata=_opt("--lr-schedule step: lr multiplier at each milestone"))
    freeze_backbone_epochs: int = field(
        default=0, metadata=_opt("cold start: ResNet trunk frozen for the first N loader epochs")
    )
    freeze_backbone_steps: int = field(
        default=20, metadata=_opt("cold start: ResNet trunk frozen for the first N steps")
    )
    vd_decay: float | None = field(default=None, metadata=_opt("visual dictionary EMA decay (default: preset's)"))
    model_overrides: list[str] = field(
        default_factory=lambda: list(DEMO_MODEL_OVERRIDES),
        metadata=_opt("model config changes on top of the preset: comma-separated section.key=value, e.g. "
                      "vd.restart_dead_codes=true,pretrain.mvm_prob=0.3 (sections/keys of soho.SohoConfig; "
                      "vd.enabled=false,pretrain.mvm_prob=0 is the no-visual-dictionary ablation); default: the "
                      "demo's tiny-scale recipe (ITC term, ITM interaction head, dead-code restart, no dropout); "
                      "'' = the preset as is"),
    )
    ds_cpu_shm_comm: bool = field(
        default=False,
        metadata=_opt("CPU only: let DeepSpeed JIT-compile its shared-memory all-reduce op (minutes on first use, "
                      "one file lock for every starting worker); off = plain gloo collectives"),
    )
    # --- loader ---------------------------------------------------------------------------------
    loader_workers: int = field(default=0, metadata=_opt("DataLoader worker processes per training worker"))
    verify_data: bool = field(
        default=True,
        metadata=_opt("check every sample against the hashes recorded when it was sharded and each manifest "
                      "shard's size + sha256; mismatches are dropped and counted (--no-verify-data: off)"),
    )
    resampled: bool | None = field(
        default=None,
        metadata=_opt("resampled shard stream (endless, exactly resumable; multi-node friendly); default: "
                      "on unless --epochs is given, which needs epoch passes"),
    )
    # --- observability and robustness -----------------------------------------------------------
    metrics_port: int = field(
        default=DEFAULT_METRICS_PORT,
        metadata=_opt("base Prometheus port; worker with local rank r serves base+r; 0 = a free port "
                      "each (logged); -1 = no metrics endpoint"),
    )
    log_every: int = field(default=20, metadata=_opt("print progress every N steps (rank 0)"))
    eval_every: int = field(
        default=0,
        metadata=_opt("held-out ITM accuracy and zero-shot retrieval every N steps on rank 0 (other ranks wait), "
                      "recorded in the step history as eval_* and exported as soho_eval_recall{direction,k}; "
                      "needs the embedded synthetic data (its held-out split; --data unset); 0 = off"),
    )
    eval_candidates: int = field(
        default=100,
        metadata=_opt("--eval-every / --final-eval: held-out images (and captions) in the retrieval pool; the "
                      "eval scores N² pairs"),
    )
    final_eval: bool | None = field(
        default=None,
        metadata=_opt("after the run, evaluate the final model on --eval-candidates held-out scenes (ITM accuracy, "
                      "zero-shot recall@1/5/10 both ways, codebook usage and perplexity) into summary.json and the "
                      "printed summary; needs the embedded synthetic data (its held-out split); default: on when "
                      "--data is unset"),
    )
    seed: int = field(default=0, metadata=_opt("seed of model init, masking and data order"))
    max_failures: int = field(
        default=3, metadata=_opt("worker-group restarts from the latest checkpoint before giving up")
    )
    max_consecutive_nonfinite: int = field(
        default=5, metadata=_opt("abort after this many consecutive non-finite (skipped) steps")
    )
    tensorboard_dir: str | None = field(
        default=None,
        metadata=_opt("TensorBoard event files of rank 0 (losses, accuracies, lr, codebook health, throughput, "
                      "held-out eval) in DIR/<run name>/: a local path or any fsspec URL (s3://bucket/tb: "
                      "written locally, uploaded at checkpoints, every minute and at the end)"),
    )
    wandb_project: str | None = field(
        default=None,
        metadata=_opt("also log the TensorBoard scalars to this Weights & Biases project (needs the wandb "
                      "package; one W&B run per run name, resumed on relaunch)"),
    )
    # --- test-only fault injection (never set in production) ------------------------------------
    fault_kill_after_checkpoint: int | None = field(
        default=None,
        metadata=_opt("TEST ONLY: SIGKILL one worker right after the checkpoint at this step is "
                      "committed (fires once per run)"),
    )
    fault_kill_rank: int = field(default=1, metadata=_opt("TEST ONLY: rank that the kill fault hits"))
    fault_crash_during_checkpoint: int | None = field(
        default=None,
        metadata=_opt("TEST ONLY: SIGKILL rank 0 in the middle of writing the checkpoint at this step "
                      "(fires once per run)"),
    )
    fault_nonfinite_batches: list[int] = field(
        default_factory=list,
        metadata=_opt("TEST ONLY: comma-separated micro-batch numbers (0-based, over the run) whose "
                      "loss is made NaN"),
    )
    fault_nonfinite_grad_batches: list[int] = field(
        default_factory=list,
        metadata=_opt("TEST ONLY: comma-separated micro-batch numbers (0-based, over the run) whose loss "
                      "stays finite but whose gradients are made NaN"),
    )

    def __post_init__(self) -> None:
        self.validate()

    # --- derived ----------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.run_name or f"soho-{self.preset}"

    @property
    def use_resampled(self) -> bool:
        return self.epochs is None if self.resampled is None else self.resampled

    @property
    def run_final_eval(self) -> bool:
        """--final-eval as resolved: unset means on exactly when the data is the embedded synthetic set."""
        return self.data is None if self.final_eval is None else self.final_eval

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.num_workers

    def model_config(self) -> Any:
        """The ``soho.SohoConfig`` this run trains: the preset, then ``backbone_weights``, ``vd_decay`` and
        ``model_overrides`` (in that order: an override wins)."""
        from soho import get_preset
        from soho.config import normalise_weights

        model_cfg = get_preset(self.preset)
        if self.backbone_weights is not None:
            model_cfg.encoder.weights = normalise_weights(self.backbone_weights)
        if self.vd_decay is not None:
            model_cfg.vd.decay = self.vd_decay
        return apply_model_overrides(model_cfg, self.model_overrides)

    def storage_options(self) -> dict[str, Any]:
        """fsspec options for s3:// URLs (endpoint from the flag, credentials from the AWS env)."""
        if self.s3_endpoint_url:
            return {"client_kwargs": {"endpoint_url": self.s3_endpoint_url}}
        return {}

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"invalid run config: {msg}")

        need(self.preset in PRESETS, f"preset={self.preset!r} must be one of {PRESETS}")
        need(self.precision in PRECISIONS, f"precision={self.precision!r} must be one of {PRECISIONS}")
        need(self.lr_schedule in LR_SCHEDULES, f"lr_schedule={self.lr_schedule!r} must be one of {LR_SCHEDULES}")
        need(self.launcher in LAUNCHERS, f"launcher={self.launcher!r} must be one of {LAUNCHERS}")
        need(self.zero_stage in (0, 1, 2, 3), f"zero_stage={self.zero_stage!r} must be 0, 1, 2 or 3")
        for name in ("max_steps", "checkpoint_every", "keep_checkpoints", "num_workers", "micro_batch_size",
                     "grad_accum", "log_every", "cpus_per_worker", "max_consecutive_nonfinite", "image_size",
                     "max_text_len", "synthetic_pairs"):
            need(getattr(self, name) >= 1, f"{name}={getattr(self, name)!r} must be >= 1")
        for name in ("warmup_steps", "freeze_backbone_epochs", "freeze_backbone_steps", "loader_workers",
                     "max_failures", "eval_every"):
            need(getattr(self, name) >= 0, f"{name}={getattr(self, name)!r} must be >= 0")
        self._validate_optimiser(need)
        need(self.backbone_optimizer in BACKBONE_OPTIMIZERS,
             f"backbone_optimizer={self.backbone_optimizer!r} must be one of {BACKBONE_OPTIMIZERS}")
        need(0.0 <= self.backbone_momentum < 1.0, f"backbone_momentum={self.backbone_momentum!r} must be in [0, 1)")
        need(0.0 < self.lr_step_gamma <= 1.0, f"lr_step_gamma={self.lr_step_gamma!r} must be in (0, 1]")
        need(all(m > 0 for m in self.lr_milestones), f"lr_milestones={self.lr_milestones!r} must all be > 0")
        need(all(a < b for a, b in zip(self.lr_milestones, self.lr_milestones[1:], strict=False)),
             f"lr_milestones={self.lr_milestones!r} must be strictly increasing")
        need(self.lr_schedule == "step" or not self.lr_milestones,
             f"lr_milestones={self.lr_milestones!r} only apply to lr_schedule=step (got {self.lr_schedule!r})")
        need(self.lr_schedule != "step" or bool(self.lr_milestones),
             "lr_milestones must be given with lr_schedule=step (e.g. --lr-milestones 25000,35000)")
        need(0.0 <= self.min_lr_ratio <= 1.0, f"min_lr_ratio={self.min_lr_ratio!r} must be in [0, 1]")
        need(self.vd_decay is None or 0.0 < self.vd_decay < 1.0, f"vd_decay={self.vd_decay!r} must be in (0, 1)")
        need(self.epochs is None or self.epochs >= 1, f"epochs={self.epochs!r} must be >= 1")
        try:  # the preset + backbone_weights + overrides: fail at parse time, not after the workers started
            enc = self.model_config().encoder
            # A file is checked where the model is built (it may exist only on the workers); a name here.
            from soho.config import weights_is_path

            if enc.weights is not None and enc.backbone != "tiny" and not weights_is_path(enc.weights):
                from soho.encoder import torchvision_weights

                torchvision_weights(enc.backbone, enc.weights)  # a name torchvision knows for this ResNet
        except (TypeError, ValueError) as exc:
            raise ValueError(f"invalid run config: {exc}") from exc
        need(not (self.epochs is not None and self.resampled),
             "epochs needs epoch passes: drop --resampled (a resampled stream has no epochs)")
        need(not (self.freeze_backbone_epochs and self.use_resampled),
             f"freeze_backbone_epochs={self.freeze_backbone_epochs} counts loader epochs, but this run reads a "
             "resampled stream (the default without --epochs), whose epoch never advances: the ResNet trunk "
             "would stay frozen (learning rate 0) for the whole run. Give the cold start in steps instead, "
             "freeze_backbone_steps = epochs x pairs / global batch (--freeze-backbone-steps), or train in epoch "
             "passes with --epochs N")
        need(self.eval_candidates >= 2, f"eval_candidates={self.eval_candidates!r} must be >= 2")
        need(not (self.final_eval and self.data is not None),
             f"final_eval needs the embedded synthetic data, the only data with a held-out split; --data "
             f"{self.data!r} has none: drop --data or --final-eval")
        need(self.eval_every == 0 or self.data is None,
             f"eval_every={self.eval_every} needs the embedded synthetic data, the only data with a held-out "
             f"split; --data {self.data!r} has none: drop --data or set --eval-every 0")
        need(self.tensorboard_dir is None or bool(self.tensorboard_dir.strip()),
             "tensorboard_dir must not be empty (omit --tensorboard-dir to turn TensorBoard logging off)")
        if self.wandb_project is not None:
            from orchestration.loggers import WANDB_MISSING, wandb_available

            need(bool(self.wandb_project.strip()), "wandb_project must not be empty (omit --wandb-project)")
            need(wandb_available(), WANDB_MISSING.format(project=self.wandb_project))
        need(-1 <= self.metrics_port <= 65535, f"metrics_port={self.metrics_port!r} must be in -1..65535")
        need(bool(self.storage_path), "storage_path must not be empty")
        need(not (self.precision == "fp16" and not self.use_gpu),
             "precision=fp16 needs --use-gpu (DeepSpeed's CPU accelerator supports fp32 and bf16)")

    def _validate_optimiser(self, need: Any) -> None:
        """Finite, in-range optimiser values; a NaN fails every range check (comparisons are False)."""
        def finite(name: str) -> bool:
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and math.isfinite(value)
            need(ok, f"{name}={value!r} must be a finite number: set --{name.replace('_', '-')} "
                     f"(YAML {name}) to a real value")
            return ok

        for name in ("lr", "adam_beta1", "adam_beta2", "adam_eps", "grad_clip", "weight_decay",
                     "backbone_momentum", "lr_step_gamma", "min_lr_ratio"):
            finite(name)
        for name in ("backbone_lr", "backbone_weight_decay", "vd_decay"):
            if getattr(self, name) is not None:
                finite(name)
        need(0.0 < self.lr <= 1.0,
             f"lr={self.lr!r} must be in (0, 1] (AdamW moves every weight by about lr per step; the recipes use "
             "1e-4 to 1e-3): set --lr / lr, e.g. 1e-4")
        if self.backbone_lr is not None:
            top = 1.0 if self.backbone_optimizer == "adamw" else 10.0
            need(0.0 <= self.backbone_lr <= top,
                 f"backbone_lr={self.backbone_lr!r} must be in [0, {top:g}] for backbone_optimizer="
                 f"{self.backbone_optimizer} (the paper's SGD trunk: 1e-2): set --backbone-lr / backbone_lr")
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            need(0.0 <= value < 1.0,
                 f"{name}={value!r} must be in [0, 1) (a moving-average decay; 1 never forgets the first "
                 f"gradient): set --{name.replace('_', '-')} / {name}, e.g. 0.9 for beta1 and 0.98-0.999 for beta2")
        need(0.0 < self.adam_eps <= 1e-3,
             f"adam_eps={self.adam_eps!r} must be in (0, 1e-3] (0 divides by zero on unused weights; a large eps "
             "turns AdamW into SGD with lr/eps): set --adam-eps / adam_eps, e.g. 1e-8 (BERT: 1e-6)")
        need(self.grad_clip >= 0.0,
             f"grad_clip={self.grad_clip!r} must be >= 0 (0 = off; the paper clips at 10): set --grad-clip / grad_clip")
        need(0.0 <= self.weight_decay <= 1.0,
             f"weight_decay={self.weight_decay!r} must be in [0, 1] (AdamW multiplies weights by 1 - lr x wd): "
             "set --weight-decay / weight_decay, e.g. 0.01")
        need(self.backbone_weight_decay is None or 0.0 <= self.backbone_weight_decay <= 1.0,
             f"backbone_weight_decay={self.backbone_weight_decay!r} must be in [0, 1] (the paper: 1e-4): set "
             "--backbone-weight-decay / backbone_weight_decay")

    # --- serialisation ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> RunConfig:
        known = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for raw_key, value in d.items():
            key = str(raw_key).replace("-", "_")
            if key not in known:
                raise ValueError(f"{source}: unknown option {raw_key!r}; known options: {sorted(known)}")
            kwargs[key] = _coerce(known[key], value, source)
        return cls(**kwargs)

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)


def apply_model_overrides(model_cfg: Any, overrides: list[str]) -> Any:
    """A new ``soho.SohoConfig``: ``model_cfg`` with each ``section.key=value`` applied (the value is parsed
    as YAML: ``true``, ``256``, ``0.3``); validated by ``SohoConfig.from_dict``."""
    from soho import SohoConfig

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


def _base_type(f: dataclasses.Field) -> tuple[type, bool]:
    """(scalar type, is_list) of a field annotation such as ``int | None`` or ``list[int]``."""
    hints = typing.get_type_hints(RunConfig)
    tp = hints[f.name]
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0]
        origin = typing.get_origin(tp)
    if origin is list:
        return typing.get_args(tp)[0], True
    return tp, False


def _coerce(f: dataclasses.Field, value: Any, source: str) -> Any:
    tp, is_list = _base_type(f)
    if value is None:
        return [] if is_list else None
    try:
        if is_list:
            if isinstance(value, str):
                value = [v for v in value.split(",") if v.strip()]
            return [tp(v) for v in value]
        if tp is bool:
            if isinstance(value, str):
                low = value.lower()
                if low not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return low in ("true", "1", "yes")
            return bool(value)
        if tp is float and isinstance(value, str):
            return float(value)
        return tp(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{source}: option {f.name!r} expects {tp.__name__}, got {value!r}") from exc


def build_parser() -> argparse.ArgumentParser:
    """argparse flags generated from the RunConfig fields (defaults suppressed so we can tell what the
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
    for f in dataclasses.fields(RunConfig):
        flag = "--" + f.name.replace("_", "-")
        tp, is_list = _base_type(f)
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        help_text = f"{help_text} [default: {default}]"
        if f.name.startswith("fault_"):  # test-only fault injection: accepted, but not listed in --help
            help_text = argparse.SUPPRESS
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        elif is_list:
            parser.add_argument(flag, type=str, help=help_text)
        else:
            kwargs: dict[str, Any] = {"type": tp, "help": help_text}
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
            parser.add_argument(flag, **kwargs)
    refuse_secret_flags(parser)  # --s3-secret-key & co.: a clear error naming the AWS_* variable to use
    return parser


def load_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    with path.open("r", encoding="utf-8") as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of option: value, got {type(data).__name__}")
    return data


def parse_run_config(argv: list[str] | None = None) -> RunConfig:
    """Dataclass defaults < YAML file (``--config``) < command-line flags."""
    return parse_cli(argv)[0]


def parse_cli(argv: list[str] | None = None) -> tuple[RunConfig, bool]:
    """(run config, whether ``--print-config`` was given)."""
    args = vars(build_parser().parse_args(argv))
    print_config = bool(args.pop("print_config", False))
    merged: dict[str, Any] = {}
    config_path = args.pop("config", None)
    if config_path is not None:
        merged.update({str(k).replace("-", "_"): v for k, v in load_yaml(Path(config_path)).items()})
    merged.update(args)
    source = f"--config {config_path} / flags" if config_path else "flags"
    return RunConfig.from_dict(merged, source=source), print_config


def resolved_config(cfg: RunConfig) -> dict[str, Any]:
    """What ``--print-config`` prints: the run config, the model config the workers build, and what follows
    from them (batch sizes, stream kind, the cold start, where the trunk's initial weights come from)."""
    from soho.config import weights_is_path
    from soho.encoder import cache_file, torchvision_weights

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
            "global_batch_size": cfg.global_batch_size,
            "resampled": cfg.use_resampled,
            "cold_start": {"freeze_backbone_steps": cfg.freeze_backbone_steps,
                           "freeze_backbone_epochs": cfg.freeze_backbone_epochs,
                           "epochs": "real loader epochs, agreed across ranks" if cfg.freeze_backbone_epochs
                           else None},
            "trunk": trunk,
        },
    }
