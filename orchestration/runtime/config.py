"""The sections of a run's configuration, shared by pre-training and fine-tuning.

Each section is a typed dataclass that checks its own values (``__post_init__``); a job's config composes
the sections it uses (``orchestration.pretrain.config.RunConfig``: all of them; fine-tuning: ``optim`` and
``scale``) and checks what spans sections. Flags and YAML keys stay flat (``--lr``, ``lr:``): the CLI
generator (:mod:`configcli`) names them after the leaves, whatever section they live in.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from configcli import opt
from data_pipeline.loader import CAPTION_CHOICES
from data_pipeline.synth import cache_name
from data_pipeline.text_augment import TextAugment
from orchestration.runtime.loggers import WANDB_MISSING, wandb_available

PRECISIONS = ("fp32", "bf16", "fp16")
LR_SCHEDULES = ("cosine", "linear", "constant", "step")
BACKBONE_OPTIMIZERS = ("adamw", "sgd")
LAUNCHERS = ("ray", "local")
DEFAULT_METRICS_PORT = 9450  # worker with local rank r serves base + r

def default_cache_dir() -> Path:
    """Local cache for the embedded synthetic data: ``$SOHO_CACHE_DIR`` or ``~/.cache/soho``."""
    return Path(os.environ.get("SOHO_CACHE_DIR") or Path.home() / ".cache" / "soho")


def synthetic_data_dir(pairs: int, seed: int, heldout: int = 0, root: str | Path | None = None,
                       captions: int = 1) -> Path:
    """The one place that names a cached copy of the embedded synthetic data: ``pairs`` pre-training pairs
    of generator ``seed``, plus ``heldout`` scenes never trained on (0: none), ``captions`` per pair."""
    return (Path(root) if root else default_cache_dir()) / cache_name(pairs, seed, heldout, captions)


def need(cond: bool, msg: str) -> None:
    """Raise the one error type of config checks, with the prefix every config message carries."""
    if not cond:
        raise ValueError(f"invalid run config: {msg}")


def at_least(obj: Any, minimum: int, names: tuple[str, ...]) -> None:
    for name in names:
        need(getattr(obj, name) >= minimum, f"{name}={getattr(obj, name)!r} must be >= {minimum}")


@dataclass
class DatasetConfig:
    """What the workers read: the shards (or the embedded synthetic data), image and text sizes, the
    loader."""

    data: str | None = field(
        default=None,
        metadata=opt(
            "training shards: manifest.json URL, brace pattern 'dir/shards-{000000..000009}.tar' or a "
            "comma-separated list; default: synthetic shards made on first use in $SOHO_CACHE_DIR "
            "(~/.cache/soho)"
        ),
    )
    synthetic_pairs: int = field(
        default=4096, metadata=opt("pairs generated for the default synthetic data (when --data is unset)")
    )
    image_size: int = field(
        default=64, metadata=opt("longest image side fed to the model (the loader resizes down to it)")
    )
    max_text_len: int = field(default=48, metadata=opt("tokens per caption incl. [CLS]/[SEP]"))
    s3_endpoint_url: str | None = field(
        default=None, metadata=opt("S3 endpoint for s3:// data and storage (e.g. MinIO); default: AWS env")
    )
    epochs: int | None = field(
        default=None, metadata=opt("stop after this many loader epochs (non-resampled data) if earlier")
    )
    loader_workers: int = field(default=0, metadata=opt("DataLoader worker processes per training worker"))
    verify_data: bool = field(
        default=True,
        metadata=opt("check every sample against the hashes recorded when it was sharded and each manifest "
                      "shard's size + sha256; mismatches are dropped and counted (--no-verify-data: off)"),
    )
    gpu_decode: bool = field(
        default=False,
        metadata=opt("decode JPEGs on the GPU (torchvision.io.decode_jpeg, nvjpeg) instead of in the loader, "
                      "for nodes whose CPUs cannot keep up; needs --use-gpu"),
    )
    resampled: bool | None = field(
        default=None,
        metadata=opt("resampled shard stream (endless, exactly resumable; multi-node friendly); default: "
                      "on unless --epochs is given, which needs epoch passes"),
    )
    text_delete_prob: float = field(
        default=0.0, metadata=opt("caption augmentation: drop each word with this probability (0: off)"))
    text_insert_prob: float = field(
        default=0.0, metadata=opt("caption augmentation: after each word, insert a random vocabulary word "
                                  "with this probability (0: off)"))
    text_swap_prob: float = field(
        default=0.0,
        metadata=opt("caption augmentation: swap neighbouring words with this probability (0: off)"))

    synthetic_captions: int = field(
        default=5,
        metadata=opt("captions per pair of the embedded synthetic data: the generator's (txt) plus N-1 from "
                     "a richer grammar (other frames, word orders, function words) in the json's captions "
                     "list"))
    caption_choice: str | None = field(
        default=None,
        metadata=opt("txt: train on each sample's txt caption; any: draw one per epoch among it and its "
                     "json's captions list (COCO-style several captions per image); default: any when "
                     "--synthetic-captions > 1, else txt"))

    @property
    def caption_mode(self) -> str:
        if self.caption_choice is not None:
            return self.caption_choice
        return "any" if self.synthetic_captions > 1 else "txt"

    def text_augment(self) -> TextAugment:
        return TextAugment(self.text_delete_prob, self.text_insert_prob, self.text_swap_prob)

    def __post_init__(self) -> None:
        at_least(self, 1, ("image_size", "max_text_len", "synthetic_pairs", "synthetic_captions"))
        need(self.caption_choice in (None, *CAPTION_CHOICES),
             f"caption_choice={self.caption_choice!r} must be one of {CAPTION_CHOICES}")
        for name in ("text_delete_prob", "text_insert_prob", "text_swap_prob"):
            need(0.0 <= getattr(self, name) < 1.0, f"{name}={getattr(self, name)!r} must be in [0, 1)")
        at_least(self, 0, ("loader_workers",))
        need(self.epochs is None or self.epochs >= 1, f"epochs={self.epochs!r} must be >= 1")
        need(not (self.epochs is not None and self.resampled),
             "epochs needs epoch passes: drop --resampled (a resampled stream has no epochs)")

    @property
    def use_resampled(self) -> bool:
        return self.epochs is None if self.resampled is None else self.resampled

    def storage_options(self) -> dict[str, Any]:
        """fsspec options for s3:// URLs (endpoint from the flag, credentials from the AWS env)."""
        if self.s3_endpoint_url:
            return {"client_kwargs": {"endpoint_url": self.s3_endpoint_url}}
        return {}


@dataclass
class CheckpointConfig:
    """Where a run lives and how often it commits a checkpoint."""

    storage_path: str = field(
        default_factory=lambda: os.environ.get("SOHO_STORAGE_PATH", "./runs"),
        metadata=opt("where checkpoints, export and summary go: local path or s3://bucket/prefix "
                      "(default $SOHO_STORAGE_PATH or ./runs)"),
    )
    run_name: str | None = field(
        default=None,
        metadata=opt("run name under the storage path; relaunching with the same name resumes "
                      "(default soho-<preset>)"),
    )
    checkpoint_every: int = field(default=120, metadata=opt("checkpoint every N optimizer steps"))
    keep_checkpoints: int = field(default=2, metadata=opt("committed checkpoints kept in storage"))


    def __post_init__(self) -> None:
        at_least(self, 1, ("checkpoint_every", "keep_checkpoints"))
        need(bool(self.storage_path), "storage_path must not be empty")


@dataclass
class ScaleConfig:
    """How many workers, on what, with which DeepSpeed partitioning, precision and batch geometry."""

    launcher: str = field(
        default="ray",
        metadata=opt("ray: Ray Train TorchTrainer; local: this process (or torchrun/deepspeed "
                      "launcher ranks from the env)", choices=LAUNCHERS),
    )
    ray_address: str | None = field(
        default=None,
        metadata=opt("Ray cluster to join; default $RAY_ADDRESS, a `ray start` cluster, or a new local one")
    )
    num_workers: int = field(default=2, metadata=opt("training workers (one per GPU, or CPU processes)"))
    min_workers: int = field(
        default=0,
        metadata=opt("Ray pre-training: elastic worker count. Ray Train starts as many workers between this "
                      "and --num-workers as the cluster's free resources fit, and restarts the group on "
                      "another count when nodes leave or join (checked every minute), resuming from the last "
                      "committed checkpoint re-partitioned for the new count; 0 = exactly --num-workers"),
    )
    cpus_per_worker: int = field(default=1, metadata=opt("CPU cores reserved per Ray worker"))
    use_gpu: bool = field(default=False, metadata=opt("one GPU per worker, NCCL"))
    zero_stage: int = field(default=2, metadata=opt("DeepSpeed ZeRO stage", choices=(0, 1, 2, 3)))
    precision: str = field(default="fp32", metadata=opt("training precision", choices=PRECISIONS))
    micro_batch_size: int = field(default=16, metadata=opt("pairs per worker per micro step"))
    grad_accum: int = field(default=1, metadata=opt("micro steps per optimizer step"))
    ds_cpu_shm_comm: bool = field(
        default=False,
        metadata=opt("CPU only: let DeepSpeed JIT-compile its shared-memory all-reduce op (minutes on "
                      "first use, one file lock for every starting worker); off = plain gloo collectives"),
    )
    grad_checkpointing: bool = field(
        default=False,
        metadata=opt("activation (gradient) checkpointing: recompute the ResNet trunk's stem and residual "
                      "blocks and each transformer layer in backward instead of keeping their activations "
                      "(less memory, more compute; same losses and gradients)"),
    )
    channels_last: bool = field(
        default=False,
        metadata=opt("ResNet trunk weights and input in channels_last (NHWC) memory format"),
    )
    compile: bool = field(
        default=False,
        metadata=opt("torch.compile the visual encoder and the transformer layers (in place, before "
                      "DeepSpeed; the first steps compile; CPU needs a C++ compiler)"),
    )


    def __post_init__(self) -> None:
        need(self.precision in PRECISIONS, f"precision={self.precision!r} must be one of {PRECISIONS}")
        need(self.launcher in LAUNCHERS, f"launcher={self.launcher!r} must be one of {LAUNCHERS}")
        need(self.zero_stage in (0, 1, 2, 3), f"zero_stage={self.zero_stage!r} must be 0, 1, 2 or 3")
        at_least(self, 1, ("num_workers", "micro_batch_size", "grad_accum", "cpus_per_worker"))
        need(0 <= self.min_workers <= self.num_workers,
             f"min_workers={self.min_workers} must be between 0 (fixed) and num_workers={self.num_workers}")
        need(self.min_workers == 0 or self.launcher == "ray",
             "min_workers (an elastic worker count) needs --launcher ray: with torchrun, relaunch with "
             "another --nproc_per_node instead (the run resumes re-partitioned)")
        need(not (self.precision == "fp16" and not self.use_gpu),
             "precision=fp16 needs --use-gpu (DeepSpeed's CPU accelerator supports fp32 and bf16)")

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.num_workers


@dataclass
class OptimConfig:
    """The optimiser, its learning-rate schedule and the cold start (the horizon ``max_steps`` included)."""

    max_steps: int = field(default=360, metadata=opt("optimizer steps to train in total"))
    lr: float = field(default=1e-3, metadata=opt("peak learning rate of everything but the ResNet trunk"))
    backbone_lr: float | None = field(
        default=None, metadata=opt("peak learning rate of the ResNet trunk (default: --lr)")
    )
    weight_decay: float = field(default=0.01, metadata=opt("AdamW weight decay (not on biases/norms)"))
    backbone_optimizer: str = field(
        default="adamw",
        metadata=opt("optimizer of the ResNet trunk: adamw (one AdamW for everything) or sgd (the paper: "
                      "SGD with momentum for the trunk, AdamW for the rest, in one hybrid optimizer)",
                      choices=BACKBONE_OPTIMIZERS),
    )
    backbone_momentum: float = field(default=0.9, metadata=opt("--backbone-optimizer sgd: SGD momentum"))
    backbone_weight_decay: float | None = field(
        default=None,
        metadata=opt("weight decay of the ResNet trunk (not on biases/norms); with sgd it is added to the "
                      "gradient as torch.optim.SGD does (paper: 1e-4); default: --weight-decay"),
    )
    adam_beta1: float = field(default=0.9, metadata=opt("AdamW beta1"))
    adam_beta2: float = field(default=0.98, metadata=opt("AdamW beta2"))
    adam_eps: float = field(default=1e-8,
                            metadata=opt("AdamW epsilon (added to the root of the second moment)"))
    grad_clip: float = field(default=1.0, metadata=opt("gradient norm clip (0 = off)"))
    warmup_steps: int = field(default=50, metadata=opt("linear learning-rate warm-up steps"))
    lr_schedule: str = field(
        default="cosine",
        metadata=opt("decay after warm-up: cosine/linear to --min-lr-ratio, constant, or step "
                      "(x --lr-step-gamma at each of --lr-milestones)", choices=LR_SCHEDULES),
    )
    min_lr_ratio: float = field(default=0.1, metadata=opt("final lr as a fraction of the peak"))
    lr_milestones: list[int] = field(
        default_factory=list,
        metadata=opt("--lr-schedule step: comma-separated optimizer steps (increasing, > 0) from which the "
                      "lr is multiplied by --lr-step-gamma once more each (0-based step index, as torch's "
                      "MultiStepLR)"),
    )
    lr_step_gamma: float = field(default=0.1,
                                 metadata=opt("--lr-schedule step: lr multiplier at each milestone"))
    freeze_backbone_epochs: int = field(
        default=0, metadata=opt("cold start: ResNet trunk frozen for the first N loader epochs")
    )
    freeze_backbone_steps: int = field(
        default=20, metadata=opt("cold start: ResNet trunk frozen for the first N steps")
    )


    def __post_init__(self) -> None:
        need(self.lr_schedule in LR_SCHEDULES,
             f"lr_schedule={self.lr_schedule!r} must be one of {LR_SCHEDULES}")
        at_least(self, 0, ("max_steps", "warmup_steps", "freeze_backbone_epochs", "freeze_backbone_steps"))
        self._check_values()
        need(self.backbone_optimizer in BACKBONE_OPTIMIZERS,
             f"backbone_optimizer={self.backbone_optimizer!r} must be one of {BACKBONE_OPTIMIZERS}")
        need(0.0 <= self.backbone_momentum < 1.0,
             f"backbone_momentum={self.backbone_momentum!r} must be in [0, 1)")
        need(0.0 < self.lr_step_gamma <= 1.0, f"lr_step_gamma={self.lr_step_gamma!r} must be in (0, 1]")
        need(all(m > 0 for m in self.lr_milestones), f"lr_milestones={self.lr_milestones!r} must all be > 0")
        need(all(a < b for a, b in zip(self.lr_milestones, self.lr_milestones[1:], strict=False)),
             f"lr_milestones={self.lr_milestones!r} must be strictly increasing")
        need(self.lr_schedule == "step" or not self.lr_milestones,
             f"lr_milestones={self.lr_milestones!r} only apply to lr_schedule=step "
             f"(got {self.lr_schedule!r})")
        need(self.lr_schedule != "step" or bool(self.lr_milestones),
             "lr_milestones must be given with lr_schedule=step (e.g. --lr-milestones 25000,35000)")
        need(0.0 <= self.min_lr_ratio <= 1.0, f"min_lr_ratio={self.min_lr_ratio!r} must be in [0, 1]")

    def _check_values(self) -> None:
        """Finite, in-range optimiser values; a NaN fails every range check (comparisons are False)."""
        def finite(name: str) -> None:
            value = getattr(self, name)
            need(isinstance(value, (int, float)) and math.isfinite(value),
                 f"{name}={value!r} must be a finite number: set --{name.replace('_', '-')} "
                 f"(YAML {name}) to a real value")

        for name in ("lr", "adam_beta1", "adam_beta2", "adam_eps", "grad_clip", "weight_decay",
                     "backbone_momentum", "lr_step_gamma", "min_lr_ratio"):
            finite(name)
        for name in ("backbone_lr", "backbone_weight_decay"):
            if getattr(self, name) is not None:
                finite(name)
        need(0.0 < self.lr <= 1.0,
             f"lr={self.lr!r} must be in (0, 1] (AdamW moves every weight by about lr per step; the "
             "recipes use 1e-4 to 1e-3): set --lr / lr, e.g. 1e-4")
        if self.backbone_lr is not None:
            top = 1.0 if self.backbone_optimizer == "adamw" else 10.0
            need(0.0 <= self.backbone_lr <= top,
                 f"backbone_lr={self.backbone_lr!r} must be in [0, {top:g}] for backbone_optimizer="
                 f"{self.backbone_optimizer} (the paper's SGD trunk: 1e-2): set --backbone-lr / backbone_lr")
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            need(0.0 <= value < 1.0,
                 f"{name}={value!r} must be in [0, 1) (a moving-average decay; 1 never forgets the first "
                 f"gradient): set --{name.replace('_', '-')} / {name}, e.g. 0.9 for beta1 and 0.98-0.999 "
                 "for beta2")
        need(0.0 < self.adam_eps <= 1e-3,
             f"adam_eps={self.adam_eps!r} must be in (0, 1e-3] (0 divides by zero on unused weights; a large "
             "eps turns AdamW into SGD with lr/eps): set --adam-eps / adam_eps, e.g. 1e-8 (BERT: 1e-6)")
        need(self.grad_clip >= 0.0,
             f"grad_clip={self.grad_clip!r} must be >= 0 (0 = off; the paper clips at 10): set --grad-clip / "
             "grad_clip")
        need(0.0 <= self.weight_decay <= 1.0,
             f"weight_decay={self.weight_decay!r} must be in [0, 1] "
             "(AdamW multiplies weights by 1 - lr x wd): "
             "set --weight-decay / weight_decay, e.g. 0.01")
        need(self.backbone_weight_decay is None or 0.0 <= self.backbone_weight_decay <= 1.0,
             f"backbone_weight_decay={self.backbone_weight_decay!r} must be in [0, 1] (the paper: 1e-4): set "
             "--backbone-weight-decay / backbone_weight_decay")


@dataclass
class ObservabilityConfig:
    """Metrics endpoint, logs, periodic and final evaluation, TensorBoard / W&B."""

    metrics_port: int = field(
        default=DEFAULT_METRICS_PORT,
        metadata=opt("base Prometheus port; worker with local rank r serves base+r; 0 = a free port "
                      "each (logged); -1 = no metrics endpoint"),
    )
    log_every: int = field(default=20, metadata=opt("print progress every N steps (rank 0)"))
    eval_every: int = field(
        default=0,
        metadata=opt("held-out ITM accuracy and zero-shot retrieval every N steps on rank 0 (other ranks "
                      "wait), recorded in the step history as eval_* and exported as "
                      "soho_eval_recall{direction,k}, soho_eval_itm_accuracy and soho_eval_seconds; on "
                      "--eval-data when given, else on the embedded synthetic data's held-out split (--data "
                      "unset); 0 = off"),
    )
    eval_candidates: int = field(
        default=100,
        metadata=opt("--eval-every / --final-eval on the synthetic held-out split: held-out images (and "
                      "captions) in the retrieval pool; the eval scores N² pairs"),
    )
    eval_data: str | None = field(
        default=None,
        metadata=opt("Karpathy-format retrieval split JSON (local path or fsspec URL, e.g. dataset_coco.json "
                      "or dataset_flickr30k.json) evaluated by --eval-every / --final-eval instead of the "
                      "synthetic held-out split: ITM accuracy and zero-shot recall@1/5/10 both ways (ITC "
                      "prefilter + ITM re-rank of the top --eval-k; --eval-exhaustive ranks every pair); "
                      "needs --eval-images"),
    )
    eval_images: str | None = field(
        default=None,
        metadata=opt("--eval-data: the image root the Karpathy entries' filepath/filename are relative to "
                      "(local path or fsspec URL)"),
    )
    eval_split: str = field(default="test",
                            metadata=opt("--eval-data: the Karpathy split evaluated (test, val, ...)"))
    eval_max_images: int | None = field(
        default=None,
        metadata=opt("--eval-data: evaluate a fixed, seeded subset of at most N images of the split (the "
                      "same subset at every evaluation and in every run; logged), so a 5k-image split does "
                      "not stall training; default: the whole split"),
    )
    eval_k: int = field(
        default=16,
        metadata=opt("--eval-data fast path: candidates per query kept by the ITC prefilter and re-ranked "
                      "by ITM (2·k·N ITM passes instead of N²)"),
    )
    eval_exhaustive: bool = field(
        default=False,
        metadata=opt("--eval-data: rank every image-caption pair with ITM (N_img x N_txt passes) instead of "
                      "the prefilter + re-rank fast path"),
    )
    final_eval: bool | None = field(
        default=None,
        metadata=opt("after the run, evaluate the final model (ITM accuracy, zero-shot recall@1/5/10 both "
                      "ways, codebook usage and perplexity) into summary.json and the printed summary: on "
                      "--eval-data when given, else on --eval-candidates held-out synthetic scenes (needs "
                      "the embedded synthetic data); default: on when --eval-data is given or --data is "
                      "unset"),
    )
    tensorboard_dir: str | None = field(
        default=None,
        metadata=opt("TensorBoard event files of rank 0 (losses, accuracies, lr, codebook health, "
                      "throughput, held-out eval) in DIR/<run name>/: a local path or any fsspec URL "
                      "(s3://bucket/tb: written locally, uploaded at checkpoints, every minute and at the "
                      "end)"),
    )
    wandb_project: str | None = field(
        default=None,
        metadata=opt("also log the TensorBoard scalars to this Weights & Biases project (needs the wandb "
                      "package; one W&B run per run name, resumed on relaunch)"),
    )


    def __post_init__(self) -> None:
        at_least(self, 1, ("log_every",))
        at_least(self, 0, ("eval_every",))
        need(self.eval_candidates >= 2, f"eval_candidates={self.eval_candidates!r} must be >= 2")
        need(self.eval_k >= 1, f"eval_k={self.eval_k!r} must be >= 1")
        need(self.eval_max_images is None or self.eval_max_images >= 2,
             f"eval_max_images={self.eval_max_images!r} must be >= 2 (an ITM negative needs another image)")
        need(bool(self.eval_split.strip()), "eval_split must not be empty (e.g. test)")
        if self.eval_data is not None:
            need(bool(self.eval_data.strip()), "eval_data must not be empty (omit --eval-data)")
            need(bool(self.eval_images and self.eval_images.strip()),
                 f"eval_data={self.eval_data!r} needs --eval-images DIR: the folder its entries' "
                 "filepath/filename are relative to (for COCO the folder holding train2014/ and val2014/)")
        else:
            for name in ("eval_images", "eval_max_images"):
                need(getattr(self, name) is None,
                     f"{name}={getattr(self, name)!r} only applies to --eval-data (give the Karpathy JSON)")
        need(self.tensorboard_dir is None or bool(self.tensorboard_dir.strip()),
             "tensorboard_dir must not be empty (omit --tensorboard-dir to turn TensorBoard logging off)")
        need(-1 <= self.metrics_port <= 65535, f"metrics_port={self.metrics_port!r} must be in -1..65535")
        if self.wandb_project is not None:
            need(bool(self.wandb_project.strip()), "wandb_project must not be empty (omit --wandb-project)")
            need(wandb_available(), WANDB_MISSING.format(project=self.wandb_project))


@dataclass
class FaultConfig:
    """Failure handling, and the test-only fault injection (hidden flags; never set in production)."""

    max_failures: int = field(
        default=3, metadata=opt("worker-group restarts from the latest checkpoint before giving up")
    )
    max_consecutive_nonfinite: int = field(
        default=5, metadata=opt("abort after this many consecutive non-finite (skipped) steps")
    )
    fault_kill_after_checkpoint: int | None = field(
        default=None,
        metadata=opt(hidden=True, help="TEST ONLY: SIGKILL one worker right after the checkpoint at this "
                      "step is committed (fires once per run)"),
    )
    fault_kill_rank: int = field(
        default=1, metadata=opt(hidden=True, help="TEST ONLY: rank that the kill fault hits")
    )
    fault_crash_during_checkpoint: int | None = field(
        default=None,
        metadata=opt(hidden=True, help="TEST ONLY: SIGKILL rank 0 in the middle of writing the checkpoint at "
                      "this step (fires once per run)"),
    )
    fault_nonfinite_batches: list[int] = field(
        default_factory=list,
        metadata=opt(hidden=True, help="TEST ONLY: comma-separated micro-batch numbers (0-based, over the "
                      "run) whose loss is made NaN"),
    )
    fault_nonfinite_grad_batches: list[int] = field(
        default_factory=list,
        metadata=opt(hidden=True, help="TEST ONLY: comma-separated micro-batch numbers (0-based, over the "
                      "run) whose loss stays finite but whose gradients are made NaN"),
    )

    def __post_init__(self) -> None:
        at_least(self, 1, ("max_consecutive_nonfinite",))
        at_least(self, 0, ("max_failures",))
