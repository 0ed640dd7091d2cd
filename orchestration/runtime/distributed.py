"""What every distributed job needs, whatever it trains: the process group, rank agreement and reductions,
RNG state, per-step generators, and the consolidation of a DeepSpeed engine's weights.

Nothing here knows pre-training from fine-tuning; both jobs import it, it imports neither.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
from typing import Any

import torch
import torch.distributed as dist


# --- process group ----------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_process_group(use_gpu: bool) -> bool:
    """Use the caller's process group; otherwise init one from torchrun-style env vars, or a 1-process
    gloo group on loopback. Returns True when this function created the group (caller destroys it)."""
    if dist.is_available() and dist.is_initialized():
        return False
    backend = "nccl" if use_gpu else "gloo"
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend=backend)
    else:
        # A 1-process group on a free loopback port, without leaving WORLD_SIZE/MASTER_PORT in this
        # process's environment: child processes (torchrun, subprocess runs) would inherit a port that this
        # process's store still holds and fail with EADDRINUSE. DeepSpeed reads LOCAL_RANK from the env.
        os.environ.setdefault("LOCAL_RANK", "0")
        dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                                world_size=1)
    release_deepspeed_group_cache()  # a group of an earlier run in this process may still be cached there
    return True


def release_deepspeed_group_cache() -> None:
    """Drop DeepSpeed's cached process-group objects (its clone of the world group, data-parallel groups).
    They outlive ``torch.distributed.destroy_process_group``; a later group in the same process (tests, a
    fine-tune after a pre-training) would otherwise hand DeepSpeed a destroyed group ("Group ... is not
    registered")."""
    try:
        from deepspeed.utils import groups
    except ImportError:  # pragma: no cover - deepspeed is a dependency
        return
    release = getattr(groups, "_release_process_group_references", None)
    if release is not None:
        release(group=None)
    else:  # older DeepSpeed: the world-group clone is the cache that bites
        groups._WORLD_GROUP = None


def destroy_process_group() -> None:
    """Destroy the default group made by :func:`ensure_process_group` and DeepSpeed's references to it."""
    dist.destroy_process_group()
    release_deepspeed_group_cache()


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The visual dictionary's ``reduce_fn``: in-place SUM over every rank."""
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


# --- small helpers ----------------------------------------------------------------------------------
def tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().float().contiguous().cpu().numpy().tobytes()).hexdigest()


def rng_state() -> dict[str, Any]:
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["cuda"])),
                                                  dtype=torch.uint8))


def step_generator(seed: int, batch_index: int, rank: int) -> torch.Generator:
    """Masking / negative sampling randomness of one micro-batch: a pure function of (seed, batch, rank),
    so a resumed run replays exactly the masks it would have drawn."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + batch_index * 7919 + rank) % (2**63 - 1))
    return g


def unwrap(engine_or_model: Any) -> torch.nn.Module:
    return getattr(engine_or_model, "module", engine_or_model)


def visual_dictionary(model: torch.nn.Module) -> Any:
    return unwrap(model).soho.visual_dictionary


def consolidated_fp32_state_dict(engine: Any) -> dict[str, torch.Tensor]:
    """Full fp32 weights of the engine's module, on every rank (collective under ZeRO).

    Parameters come from DeepSpeed's fp32 master copies (``safe_get_full_fp32_param``: gathered under
    ZeRO-1/2/3, so a bf16 run still exports fp32 values); modules without a master copy (stage 0 fp32)
    use the parameter itself. Floating buffers are cast to fp32 (BatchNorm stats of a bf16 run)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    module = unwrap(engine)
    out: dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters():
        full = (safe_get_full_fp32_param(p)
                if engine.zero_optimization_stage() > 0 or engine.bfloat16_enabled() else None)
        if full is None:
            if hasattr(p, "ds_id"):  # ZeRO-3 partitioned parameter without a master copy
                with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                    full = p.detach().clone()
            else:
                full = p.detach()
        out[name] = full.detach().float().cpu().clone()
    for name, b in module.named_buffers():
        out[name] = (b.detach().float() if b.is_floating_point() else b.detach()).cpu().clone()
    return out


def all_agree(ok: bool, device: torch.device | str = "cpu") -> bool:
    """One all-reduce (MIN) of a flag: True only when every rank says True (no collective in one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())
