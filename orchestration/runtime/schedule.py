"""Optimizer groups (ResNet trunk vs the rest, decay vs no decay; the trunk's optimizer kind) and the per-step
learning rate.

The schedule is a pure function of the step (and of the loader epoch for the cold start), so it needs no
state of its own in a checkpoint: a resumed run recomputes the same learning rates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from orchestration.runtime.config import OptimConfig


@dataclass(frozen=True)
class GroupSpec:
    name: str  # "backbone" | "rest"
    decay: bool


def backbone_parameter_names(model: nn.Module) -> set[str]:
    """Names of the ResNet trunk's parameters: every module exposing ``set_backbone_trainable`` and a
    ``trunk`` sub-module (the grid encoder) contributes its trunk."""
    names: set[str] = set()
    for mod_name, module in model.named_modules():
        trunk = getattr(module, "trunk", None)
        if hasattr(module, "set_backbone_trainable") and isinstance(trunk, nn.Module):
            prefix = f"{mod_name}.trunk." if mod_name else "trunk."
            names.update(prefix + n for n, _ in trunk.named_parameters())
    return names


def _no_decay(name: str, param: nn.Parameter) -> bool:
    # Biases, norm scales and 1-d embeddings-like vectors are not decayed (standard BERT/ResNet practice).
    return param.ndim < 2 or "norm" in name.lower() or name.endswith(".bias")


def param_groups(model: nn.Module, cfg: OptimConfig) -> tuple[list[dict], list[GroupSpec]]:
    """Optimizer parameter groups and their specs (same order). Every parameter is included, frozen or not,
    so that ZeRO's flat buffers cover the trunk when the cold start ends.

    Each group carries ``"optimizer"``: ``cfg.backbone_optimizer`` for the trunk, ``"adamw"`` for the rest
    (read by :class:`orchestration.runtime.optim.HybridSGDAdamW`; torch's AdamW ignores it), and its weight
    decay: ``backbone_weight_decay`` (default ``weight_decay``) for the trunk, 0 on biases/norms. SGD groups
    also carry ``momentum``."""
    backbone = backbone_parameter_names(model)
    buckets: dict[GroupSpec, list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        spec = GroupSpec("backbone" if name in backbone else "rest", not _no_decay(name, p))
        buckets.setdefault(spec, []).append(p)
    groups: list[dict] = []
    specs: list[GroupSpec] = []
    for spec in sorted(buckets, key=lambda s: (s.name, not s.decay)):
        peak = base_lr(cfg, spec)
        kind = cfg.backbone_optimizer if spec.name == "backbone" else "adamw"
        group = {"params": buckets[spec], "lr": peak, "weight_decay": group_weight_decay(cfg, spec),
                 "optimizer": kind}
        if kind == "sgd":
            group["momentum"] = cfg.backbone_momentum
        groups.append(group)
        specs.append(spec)
    return groups, specs


def base_lr(cfg: OptimConfig, spec: GroupSpec) -> float:
    if spec.name == "backbone" and cfg.backbone_lr is not None:
        return cfg.backbone_lr
    return cfg.lr


def group_weight_decay(cfg: OptimConfig, spec: GroupSpec) -> float:
    if not spec.decay:
        return 0.0
    if spec.name == "backbone" and cfg.backbone_weight_decay is not None:
        return cfg.backbone_weight_decay
    return cfg.weight_decay


def lr_factor(cfg: OptimConfig, step: int) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based): linear warm-up, then
    cosine / linear decay to ``min_lr_ratio``, constant, or step: ``lr_step_gamma`` to the power of the
    number of ``lr_milestones`` reached (``step >= m``, as torch's MultiStepLR; a milestone inside the
    warm-up also scales the ramp)."""
    if cfg.lr_schedule == "step":
        passed = sum(1 for m in cfg.lr_milestones if step >= m)
        ramp = (step + 1) / cfg.warmup_steps if cfg.warmup_steps and step < cfg.warmup_steps else 1.0
        return ramp * cfg.lr_step_gamma**passed
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, max(0.0, (step - cfg.warmup_steps) / span))
    if cfg.lr_schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - progress
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def backbone_frozen(cfg: OptimConfig, step: int, epoch: int) -> bool:
    """The paper's cold start: the trunk is frozen for the first N steps and/or N loader epochs."""
    return step < cfg.freeze_backbone_steps or epoch < cfg.freeze_backbone_epochs


def apply_lr(optimizer: torch.optim.Optimizer, specs: list[GroupSpec], cfg: OptimConfig, step: int,
             frozen: bool) -> float:
    """Set every group's lr for this step; a frozen trunk gets lr 0 so that no optimizer update can
    move it even through AdamW's momentum or weight decay. Returns the rest-group lr (for logging)."""
    factor = lr_factor(cfg, step)
    if len(optimizer.param_groups) != len(specs):
        raise RuntimeError(
            f"optimizer has {len(optimizer.param_groups)} param groups but the schedule knows {len(specs)}"
        )
    rest_lr = cfg.lr * factor
    for group, spec in zip(optimizer.param_groups, specs, strict=True):
        lr = base_lr(cfg, spec) * factor
        if spec.name == "backbone" and frozen:
            lr = 0.0
        group["lr"] = lr
    return rest_lr
