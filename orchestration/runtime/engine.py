"""``build_engine``: a model, an optimisation section and a scale section in; a training engine out.

One place decides the precision cast, the parameter groups (trunk / rest, decay / no decay), the optimiser
(torch's AdamW, or :class:`~orchestration.runtime.optim.HybridSGDAdamW` for the paper's SGD trunk), the
DeepSpeed config (:mod:`orchestration.runtime.ds_config`) and DeepSpeed's initialisation — or, with
``kind="torch"``, plain torch (DDP when there is more than one rank) for machines without DeepSpeed — and the
training-step options of the scale section (``--grad-checkpointing``, ``--channels-last``, ``--compile``,
:func:`apply_step_options`). Pre-training and fine-tuning both build their engine here.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Any

import torch

from orchestration.runtime.config import OptimConfig, ScaleConfig
from orchestration.runtime.ds_config import build_deepspeed_config
from orchestration.runtime.optim import HybridSGDAdamW
from orchestration.runtime.schedule import GroupSpec, param_groups
from soho.encoder import GridEncoder
from soho.transformer import CrossModalEncoder

ENGINES = ("deepspeed", "torch")
COMPILE_BACKEND = "inductor"
"""torch.compile backend of ``--compile`` (tests set "aot_eager": the same tracing, no C++ build)."""


@dataclass
class Engine:
    """What a training loop steps: ``engine`` (DeepSpeed engine, DDP or the module itself), the optimizer
    whose groups the schedule sets (DeepSpeed's wrapper where there is one), the group specs (same order),
    the DeepSpeed config (``None`` with plain torch) and the dtype the model's floating weights hold."""

    engine: Any
    optimizer: torch.optim.Optimizer
    group_specs: list[GroupSpec]
    ds_config: dict[str, Any] | None
    dtype: torch.dtype
    kind: str

    @property
    def module(self) -> torch.nn.Module:
        return getattr(self.engine, "module", self.engine)

    def backward_step(self, loss: torch.Tensor, grad_clip: float) -> None:
        """One optimiser step of plain torch (DeepSpeed engines step through ``engine.backward/step``)."""
        if self.kind == "deepspeed":
            self.engine.backward(loss)
            self.engine.step()
            return
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), grad_clip)
        self.optimizer.step()


def precision_dtype(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def build_optimizer(model: torch.nn.Module,
                    optim: OptimConfig) -> tuple[torch.optim.Optimizer, list[GroupSpec]]:
    """Parameter groups and the client optimizer: one AdamW, or SGD+momentum for the trunk and AdamW for the
    rest in one :class:`HybridSGDAdamW` (``backbone_optimizer=sgd``, the paper's)."""
    groups, specs = param_groups(model, optim)
    betas = (optim.adam_beta1, optim.adam_beta2)
    if optim.backbone_optimizer == "sgd":
        optimizer: torch.optim.Optimizer = HybridSGDAdamW(
            groups, lr=optim.lr, betas=betas, eps=optim.adam_eps, weight_decay=optim.weight_decay,
            momentum=optim.backbone_momentum)
    else:
        optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=betas, eps=optim.adam_eps,
                                      weight_decay=optim.weight_decay)
    return optimizer, specs


def cpu_compiler() -> str | None:
    """The C++ compiler TorchInductor would use for CPU code: ``$CXX``, else g++/c++/clang++ on PATH."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def apply_step_options(model: torch.nn.Module, scale: ScaleConfig, kind: str = "torch") -> list[str]:
    """Switch on the scale section's training-step options in every SOHO visual encoder and cross-modal
    transformer inside ``model`` (any pre-training or task model); returns what was applied, for the log.

    - ``grad_checkpointing``: the ResNet trunk's stem and residual blocks and each BERT layer recompute their
      activations in backward (:meth:`GridEncoder.set_grad_checkpointing`,
      :meth:`CrossModalEncoder.set_grad_checkpointing`); the visual dictionary sits after the trunk, outside
      every recomputed region, so its EMA update runs once per step.
    - ``channels_last``: the trunk's input in NHWC, and its weights too except under DeepSpeed (``kind``),
      whose ``initialize`` views each parameter as bytes to broadcast it (an NHWC tensor cannot be:
      "stride(-1) must be 1") and re-flattens them into its buffers anyway; the NHWC input keeps the
      convolutions NHWC.
    - ``compile``: ``nn.Module.compile()`` of each encoder and transformer, in place, before DeepSpeed wraps
      the model: parameter names, state dicts and checkpoints stay exactly those of the eager model (a
      ``torch.compile(model)`` wrapper would prefix every key with ``_orig_mod.``), the masking, the visual
      dictionary's update and its all-reduce stay eager, and the same call serves DeepSpeed and plain-torch
      engines. DeepSpeed 0.19.8's ``engine.compile()`` compiles the whole wrapped module after
      ``initialize`` (all of the above traced too); it is not used.
    """
    if not (scale.grad_checkpointing or scale.channels_last or scale.compile):
        return []
    encoders = [m for m in model.modules() if isinstance(m, GridEncoder)]
    fusers = [m for m in model.modules() if isinstance(m, CrossModalEncoder)]
    if not encoders and not fusers:
        raise ValueError(
            f"--grad-checkpointing/--channels-last/--compile: {type(model).__name__} holds no SOHO "
            "GridEncoder or CrossModalEncoder to apply them to")
    applied = []
    if scale.grad_checkpointing:
        for m in encoders + fusers:
            m.set_grad_checkpointing(True)
        applied.append("grad_checkpointing")
    if scale.channels_last:
        for e in encoders:
            e.set_channels_last(True, weights=kind != "deepspeed")
        applied.append("channels_last")
    if scale.compile:
        if not scale.use_gpu and COMPILE_BACKEND == "inductor" and cpu_compiler() is None:
            raise RuntimeError(
                "--compile on CPU needs a C++ compiler: TorchInductor generates and builds C++ kernels, and "
                "neither $CXX nor g++/c++/clang++ is on PATH. Install one (Debian: apt-get install g++) or "
                "drop --compile")
        for e in encoders:
            # Dynamo cannot trace a checkpoint with a context_fn (the BN-statistics guard): under
            # checkpointing each recomputed unit is compiled and the checkpoint around it stays eager.
            for unit in e.segments if e.grad_checkpointing else [e]:
                unit.compile(backend=COMPILE_BACKEND)
        for t in fusers:
            t.compile(backend=COMPILE_BACKEND)
        applied.append("compile")
    return applied


def build_engine(model: torch.nn.Module, optim: OptimConfig, scale: ScaleConfig, world_size: int,
                 kind: str = "deepspeed", device: torch.device | str = "cpu") -> Engine:
    """The engine a job trains ``model`` with, on an initialised process group of ``world_size`` ranks."""
    if kind not in ENGINES:
        raise ValueError(f"engine {kind!r}: expected one of {ENGINES}")
    dtype = precision_dtype(scale.precision)
    if kind == "deepspeed" and dtype != torch.float32:
        # ZeRO-1/2 cast the whole module (params and buffers) to 16 bit; ZeRO-3 casts only the partitioned
        # params, leaving BatchNorm running stats fp32 (a dtype mismatch in the trunk). Casting up front gives
        # every stage the same model; the visual dictionary keeps its buffers fp32 by design.
        model = model.to(dtype)
    apply_step_options(model, scale, kind)
    optimizer, specs = build_optimizer(model, optim)
    if kind == "torch":
        model = model.to(device)
        engine = torch.nn.parallel.DistributedDataParallel(model) if world_size > 1 else model
        # plain torch keeps fp32 weights; bf16 runs under autocast in the loop
        return Engine(engine, optimizer, specs, None, torch.float32, kind)
    import deepspeed  # heavy: only where a DeepSpeed engine is built

    if not scale.use_gpu and not scale.ds_cpu_shm_comm:
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce (`deepspeed_shm_comm`) when its comm
        # layer starts: minutes of C++ on a fresh machine, under a file lock every starting worker waits on.
        # For CPU runs (tests, demo) gloo's collectives are enough, so skip the op.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    ds_config = build_deepspeed_config(scale, optim, world_size)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                           dist_init_required=False)
    if world_size == 1 and scale.zero_stage == 0:
        # One rank has nothing to average, but ZeRO-0's backward still flattens every gradient into a bucket,
        # all-reduces it over itself and copies it back (~12 % of a tiny-preset CPU step). ZeRO-1/2/3 move
        # gradients into their partitions on that path, so they keep it.
        engine.enable_backward_allreduce = False
    if world_size == 1 and scale.zero_stage in (1, 2):
        skip_single_rank_reduction(engine.optimizer)
    return Engine(engine, engine.optimizer, specs, ds_config, dtype, kind)


def skip_single_rank_reduction(zero_optimizer: Any) -> bool:
    """On one rank, let ZeRO-1/2 skip the all-reduce of its gradient bucket, which changes no gradient.

    Without contiguous gradients (ds_config: CPU runs), DeepSpeed 0.19.8's ``reduce_ipg_grads`` hands the
    bucket to ``buffered_reduce_fallback``: flatten every gradient into a new buffer, divide it by the world
    size, all-reduce it, copy each slice back into its gradient (``allreduce_and_copy``). Over one rank
    that is x / 1.0 and an identity all-reduce, so the gradients come out bit-equal, at the cost of four
    passes over every gradient: 9-13 ms of a ~260 ms tiny-preset ZeRO-2 step on one CPU core. The
    wall-clock gain is smaller (2-10 ms in paired runs): the gradients' first read after backward then falls
    to the global norm in ``step``, which gets slower by part of it. Its bookkeeping (which parameters were
    reduced, the partitions ZeRO-2 builds from the gradients) lives in the callers and still runs. Kept
    where the reduction does more than average: a communication dtype other than the gradients' (a lossy
    round trip), sequence parallelism (divides by less than the world size), contiguous gradients, overlap
    or offload (other paths, not this method). Returns whether the bypass was installed.
    """
    original = getattr(zero_optimizer, "buffered_reduce_fallback", None)
    if original is None or not hasattr(zero_optimizer, "dp_process_group"):
        return False  # not DeepSpeed's stage-1/2 optimizer, or another DeepSpeed than this was written for
    if (torch.distributed.get_world_size(group=zero_optimizer.dp_process_group) != 1
            or getattr(zero_optimizer, "sequence_parallel_size", 1) != 1
            or getattr(zero_optimizer, "contiguous_gradients", True)
            or getattr(zero_optimizer, "overlap_comm", True)
            or getattr(zero_optimizer, "cpu_offload", True)):
        return False

    def reduce_over_one_rank(rank: int | None, grads: list[torch.Tensor],
                             communication_data_type: torch.dtype, elements_per_buffer: int = 500000000,
                             log: Any = None) -> None:
        if any(g.dtype != communication_data_type for g in grads):
            original(rank, grads, communication_data_type, elements_per_buffer=elements_per_buffer, log=log)

    zero_optimizer.buffered_reduce_fallback = reduce_over_one_rank
    return True
