"""The paper's optimiser as one torch optimizer: SGD with momentum for the ResNet trunk, AdamW for the rest.

SOHO trains the backbone with SGD (lr 1e-2, momentum 0.9, wd 1e-4) and everything else with AdamW (lr 1e-4,
wd 0.01). DeepSpeed takes exactly one client optimizer, so :class:`HybridSGDAdamW` is a single
``torch.optim.Optimizer`` whose param groups each carry an ``"optimizer"`` key (``"sgd"`` or ``"adamw"``) and
that optimizer's hyperparameters; ``step()`` runs torch's own functional kernels per group
(``torch.optim.sgd.sgd`` — weight decay added to the gradient, as ``torch.optim.SGD`` — and
``torch.optim.adam.adam(decoupled_weight_decay=True)``, i.e. ``torch.optim.AdamW``), so the updates are
torch's, value for value.

Under ZeRO-1/2 DeepSpeed replaces each group's ``params`` by one flat fp32 partition and keeps every other
key of the group dict, then calls ``step()`` with ``param_groups`` narrowed to one group at a time; both
work here because the kind of update is read from the group, never from a parameter. Every parameter's state
has the same keys in both kinds of groups (unused ones are ``None``): DeepSpeed's elastic-checkpoint restore
reads the key set of group 0 and looks those keys up in every group.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.adam import adam as _adam_kernel
from torch.optim.sgd import sgd as _sgd_kernel

OPTIMIZERS = ("sgd", "adamw")
_STATE_KEYS = ("step", "momentum_buffer", "exp_avg", "exp_avg_sq")


class HybridSGDAdamW(torch.optim.Optimizer):
    """SGD-with-momentum groups and AdamW groups in one optimizer (group key ``"optimizer"``).

    Group keys: ``lr``, ``weight_decay``, ``optimizer``; sgd groups ``momentum``, ``dampening``, ``nesterov``;
    adamw groups ``betas``, ``eps``. Missing keys take the constructor's defaults.
    """

    def __init__(self, params: Any, lr: float = 1e-3, *, optimizer: str = "adamw", weight_decay: float = 0.0,
                 momentum: float = 0.9, dampening: float = 0.0, nesterov: bool = False,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={optimizer!r} must be one of {OPTIMIZERS}")
        defaults = {"lr": lr, "optimizer": optimizer, "weight_decay": weight_decay, "momentum": momentum,
                    "dampening": dampening, "nesterov": nesterov, "betas": tuple(betas), "eps": eps,
                    "maximize": False}
        super().__init__(params, defaults)
        for group in self.param_groups:
            self._check_group(group)

    @staticmethod
    def _check_group(group: dict[str, Any]) -> None:
        kind = group.get("optimizer")
        if kind not in OPTIMIZERS:
            raise ValueError(f"param group optimizer={kind!r} must be one of {OPTIMIZERS}")
        if group["lr"] < 0 or group["weight_decay"] < 0:
            raise ValueError(f"param group ({kind}): lr and weight_decay must be >= 0")
        if kind == "sgd" and not 0.0 <= group["momentum"] < 1.0:
            raise ValueError(f"sgd param group: momentum={group['momentum']!r} must be in [0, 1)")
        if kind == "adamw" and not all(0.0 <= b < 1.0 for b in group["betas"]):
            raise ValueError(f"adamw param group: betas={group['betas']!r} must be in [0, 1)")

    def _state(self, p: torch.Tensor) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            state.update({k: None for k in _STATE_KEYS})
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
        return state

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("HybridSGDAdamW does not support sparse gradients")
            if group["optimizer"] == "sgd":
                self._sgd_group(group, params)
            elif group["optimizer"] == "adamw":
                self._adamw_group(group, params)
            else:
                raise ValueError(f"param group optimizer={group['optimizer']!r} must be one of {OPTIMIZERS}")
        return loss

    def _sgd_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        states = [self._state(p) for p in params]
        bufs = [s["momentum_buffer"] for s in states]
        _sgd_kernel(params, [p.grad for p in params], bufs, weight_decay=group["weight_decay"],
                    momentum=group["momentum"], lr=group["lr"], dampening=group["dampening"],
                    nesterov=group["nesterov"], maximize=group["maximize"], foreach=None)
        for s, buf in zip(states, bufs, strict=True):
            s["step"] += 1
            if group["momentum"] != 0:
                s["momentum_buffer"] = buf  # the kernel creates the buffer on the first step

    def _adamw_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        states = [self._state(p) for p in params]
        for p, s in zip(params, states, strict=True):
            if s["exp_avg"] is None:
                s["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                s["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        beta1, beta2 = group["betas"]
        _adam_kernel(params, [p.grad for p in params], [s["exp_avg"] for s in states],
                     [s["exp_avg_sq"] for s in states], [], [s["step"] for s in states], foreach=None,
                     decoupled_weight_decay=True, amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
                     weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"])
