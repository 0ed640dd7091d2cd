"""Resume a pre-training checkpoint on another number of workers: re-partition ZeRO state N -> M.

A checkpoint's DeepSpeed files are cut by the world size that wrote them: under ZeRO-1/2 each rank holds its
slice of every param group's flat fp32 master weights and optimizer state, under ZeRO-3 its part of every
parameter too. DeepSpeed 0.19.8's ``load_checkpoint`` reads old rank r's slice into new rank r (its "elastic"
ZeRO-1/2 restore needs checkpoints saved with ``elastic_checkpoint``, and ZeRO-3 has none), so the worker used
to refuse another ``--num-workers``. Two ways were measured (DeepSpeed 0.19.8, CPU/gloo, real checkpoints of
this project; "tiny" preset, 4.6 M parameters, 59-73 MB of DeepSpeed files for 2 ranks; "small" preset,
36 M parameters, 467-503 MB; times on a shared, loaded 2-core machine):

(a) DeepSpeed's universal checkpoint: ``deepspeed.checkpoint.ds_to_universal`` on rank 0 (in process, inside
    :func:`~orchestration.runtime.checkpoint.weights_only_loads`: its own loads say ``weights_only=False``),
    then an engine built with ``checkpoint.load_universal``.

    * The paper's SGD trunk + AdamW rest (``--backbone-optimizer sgd``, HybridSGDAdamW groups): the conversion
      fails, ZeRO-2 bf16 and ZeRO-3 bf16 alike (``TypeError`` in ``torch.cat`` of ``None``): it reads
      ``exp_avg``/``exp_avg_sq`` of every group and knows no ``momentum_buffer``.
    * AdamW only: master weights, moments and steps come back exactly (ZeRO-2 fp32/bf16, ZeRO-3 fp32/bf16,
      2 -> 1), but no module buffer does: the visual dictionary's codebook, ``num_updates`` and
      ``last_used`` keep the fresh model's random values (the run would go on with another codebook).
    * Time 2 -> 1 (conversion + load): tiny ZeRO-2 fp32 2.95 s (2.24 s converting), ZeRO-2 bf16 2.41 s,
      ZeRO-3 bf16 2.37 s (ZeRO-3 fp32 9.4 s on a busier moment); small ZeRO-2 bf16 11.4 s (8.7 s),
      ZeRO-3 bf16 9.1 s (7.6 s). It writes a second copy, 0.9-1.5x the checkpoint (small: 508 and 722 MB),
      which every node of the new world must then read.

(b) Our own consolidation (this module): every new rank opens the N old ranks' optimizer files (and rank 0's
    model states) weights-only and memory-mapped, indexes where each parameter's elements lie
    (:func:`zero12_pieces` from DeepSpeed's ``param_slice_mappings``; :func:`zero3_pieces` from
    ``param_shapes`` and ZeRO-3's even split), creates the fresh optimizer's state with the checkpoint's keys
    and steps, and sets each parameter's full fp32 master and every per-element state
    (``safe_set_full_fp32_param`` / ``safe_set_full_optimizer_state`` under ZeRO-1/2; under ZeRO-3 its own
    part through ``safe_set_local_*``, because 0.19.8's ``safe_set_full_*`` for ZeRO-3 fails on a parameter
    whose size the new world size does not divide: measured 2 -> 3, "start + length exceeds dimension
    size"), then the training-precision weights from the masters, rank 0's module buffers and the engine's
    step counters.

    * Exact in every case measured: full fp32 masters, every optimizer state key (``exp_avg``,
      ``exp_avg_sq``, ``momentum_buffer``, ``step``), the bf16/fp32 weights (= masters rounded, as after a
      step) and all persistent buffers (codebook, EMA statistics, BatchNorm statistics); ZeRO-1 fp32,
      ZeRO-2 fp32 / bf16 / bf16 SGD+AdamW, ZeRO-3 fp32 / bf16 / bf16 SGD+AdamW; 2 -> 1, 2 -> 3, 1 -> 2.
    * Time (all ranks, collective): tiny 0.20-0.79 s (2 -> 1), 0.54-0.63 s (2 -> 3), 0.20-0.26 s (1 -> 2);
      small 1.48 s (ZeRO-2 bf16) and 1.12 s (ZeRO-3 bf16). Memory: peak RSS +0.56 / +0.70 GB on small
      (1 new rank reading the whole 0.48 GB checkpoint; mostly file-backed pages of the mapped files, shared
      by the ranks of a node), +0.05-0.11 GB on tiny. Nothing is written. A ZeRO-3 rank reads only its own
      part of each parameter; a ZeRO-1/2 rank assembles one full parameter at a time.

Decision: (b). It is the only one that keeps the visual dictionary and the paper's SGD/AdamW groups, it is
6-10x faster and needs no second copy on shared storage, and it keeps the trust model: nothing is unpickled
with ``weights_only=False`` (DeepSpeed's three allow-listed types only), and it reads only files that the
resume's verification already checked (sizes, sha256 of every rank's record, weights-only test load).
ZeRO-0 (fp32 and bf16: DeepSpeed 0.19.8 writes one unpartitioned ``mp_rank_00_model_states.pt``) needs no
conversion: DeepSpeed's own loader reads it at any world size (measured exact, 2 -> 1). Not supported: fp16
(its loss-scaler state; refused with advice), ZeRO-1/2 files saved with ``elastic_checkpoint``, tensor or
pipeline parallelism (not used here).

Data position and RNG (:func:`resume_other_world`): every old rank's loader state goes, in old rank order,
to ``PretrainLoader.load_states_from`` (``data_pipeline/loader.py``); a new rank below N keeps old rank r's
RNG state, the others seed from (seed, step, rank) (:func:`derived_seed`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from orchestration.runtime.checkpoint import (
    DS_TAG,
    UntrustedCheckpointError,
    deepspeed_safe_globals,
    read_rank_record,
    weights_only_loads,
)
from orchestration.runtime.distributed import set_rng_state, unwrap

logger = logging.getLogger(__name__)

# DeepSpeed 0.19.8 checkpoint keys (deepspeed.checkpoint.constants), spelled out: no deepspeed import at
# module level (the pure arithmetic below is used and tested without it).
OPTIMIZER_STATE_DICT = "optimizer_state_dict"
BASE_OPTIMIZER_STATE = "base_optimizer_state"
SINGLE_PARTITION_OF_FP32_GROUPS = "single_partition_of_fp32_groups"
GROUP_PADDINGS = "group_paddings"
PARAM_SLICE_MAPPINGS = "param_slice_mappings"
FP32_FLAT_GROUPS = "fp32_flat_groups"
ZERO_STAGE = "zero_stage"
PARAM_SHAPES = "param_shapes"
FP32 = "fp32"  # the key of the fp32 master weight beside the optimizer's own state keys
ENGINE_COUNTERS = ("global_steps", "global_samples", "skipped_steps")


class ReshardError(RuntimeError):
    """A checkpoint that cannot be re-partitioned for this run (a missing file, another model, fp16)."""


# --- pure arithmetic: where each parameter's elements lie in the N ranks' flat partitions ---------------
@dataclass(frozen=True)
class Piece:
    """``numel`` consecutive elements of one parameter, at ``start`` of flat group ``group`` of rank
    ``rank``'s partition. A parameter's pieces in rank order, concatenated, are the parameter flattened."""

    rank: int
    group: int
    start: int
    numel: int


def _start_numel(addr: Any) -> tuple[int, int]:
    if isinstance(addr, tuple | list):
        start, numel = addr
        return int(start), int(numel)
    return int(addr.start), int(addr.numel)  # deepspeed.utils.tensor_fragment.fragment_address


def zero12_pieces(slice_mappings: Sequence[Sequence[Mapping[str, Any]]]) -> dict[str, list[Piece]]:
    """ZeRO-1/2 (and ZeRO-0 bf16): each param group is flattened (parameters back to back, alignment padding
    between them) and cut into N equal consecutive partitions, so a parameter lies in one or more neighbouring
    ranks. ``slice_mappings[rank][group][name]`` is DeepSpeed's ``param_slice_mappings`` entry: where the
    rank's fragment of ``name`` starts in its partition and how many elements it holds (a ``fragment_address``
    or a ``(start, numel)`` pair)."""
    out: dict[str, list[Piece]] = {}
    for rank, groups in enumerate(slice_mappings):
        for group, mapping in enumerate(groups):
            for name, addr in mapping.items():
                start, numel = _start_numel(addr)
                if numel <= 0 or start < 0:
                    raise ReshardError(f"rank {rank} group {group}: {name} has fragment ({start}, {numel})")
                out.setdefault(name, []).append(Piece(rank, group, start, numel))
    for name, pieces in out.items():
        if len({p.group for p in pieces}) != 1:
            raise ReshardError(f"{name} lies in different param groups on different ranks: {pieces}")
    return out


def zero3_partition_numel(numel: int, world_size: int) -> int:
    """ZeRO-3 cuts every parameter into ``world_size`` equal parts (the last one padded)."""
    return math.ceil(numel / world_size)


def zero3_pieces(param_shapes: Sequence[Mapping[str, Sequence[int]]],
                 world_size: int) -> dict[str, list[Piece]]:
    """ZeRO-3: every parameter is split into N parts of ``ceil(numel / N)`` elements (rank r holds part r,
    the tail padded); each rank's flat sub-group ``i`` holds its part of each parameter of ``param_shapes[i]``
    back to back, in that order."""
    out: dict[str, list[Piece]] = {}
    for group, shapes in enumerate(param_shapes):
        offset = 0
        for name, shape in shapes.items():
            numel = math.prod(int(s) for s in shape)
            part = zero3_partition_numel(numel, world_size)
            pieces = []
            for rank in range(world_size):
                valid = max(0, min(part, numel - rank * part))
                if valid:
                    pieces.append(Piece(rank, group, offset, valid))
            if name in out:
                raise ReshardError(f"{name} appears in two ZeRO-3 sub-groups")
            out[name] = pieces
            offset += part
    return out


def assemble(pieces: Sequence[Piece], flat: Callable[[int, int], torch.Tensor],
             shape: Sequence[int]) -> torch.Tensor:
    """The full tensor of one parameter from its pieces; ``flat(rank, group)`` is that rank's flat tensor."""
    numel = math.prod(int(s) for s in shape)
    got = sum(p.numel for p in pieces)
    if got != numel:
        raise ReshardError(f"pieces hold {got} elements, the parameter of shape {tuple(shape)} has {numel}")
    parts = [flat(p.rank, p.group).narrow(0, p.start, p.numel) for p in pieces]
    full = torch.cat(parts) if len(parts) > 1 else parts[0].clone()
    return full.view(*shape)


def assemble_range(pieces: Sequence[Piece], flat: Callable[[int, int], torch.Tensor], start: int,
                   length: int) -> torch.Tensor:
    """Elements ``[start, start + length)`` of one flattened parameter, reading only the pieces that hold them
    (a ZeRO-3 rank of the new world needs only its own part)."""
    out = []
    pos = 0  # flat position of the current piece
    end = start + length
    for p in pieces:
        lo, hi = max(start, pos), min(end, pos + p.numel)
        if lo < hi:
            out.append(flat(p.rank, p.group).narrow(0, p.start + lo - pos, hi - lo))
        pos += p.numel
    if sum(t.numel() for t in out) != length:
        raise ReshardError(f"elements [{start}, {end}) are not all held by the pieces (parameter has {pos})")
    if not out:
        return torch.zeros(0)
    return torch.cat(out) if len(out) > 1 else out[0].clone()


# --- the N ranks' files --------------------------------------------------------------------------------
def _load(path: Path) -> Any:
    """Weights-only, memory-mapped load with DeepSpeed's allow-listed types (never full pickle)."""

    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def _one(ds_dir: Path, pattern: str, what: str) -> Path:
    found = sorted(ds_dir.glob(pattern))
    if len(found) != 1:
        raise ReshardError(f"{ds_dir}: expected one {what} ({pattern}), found {[p.name for p in found]}")
    return found[0]


def _stage_of(optim_sd: Mapping[str, Any]) -> int:
    stage = optim_sd.get(ZERO_STAGE)
    if stage is None:
        return 0  # DeepSpeed's BF16_Optimizer (ZeRO-0 + bf16): partitioned like ZeRO-1, no stage recorded
    return int(stage)


@dataclass
class ShardedCheckpoint:
    """The DeepSpeed files of one checkpoint written by ``world_size`` ranks (``ds/`` of a step folder),
    opened memory-mapped and weights-only, indexed by parameter name.

    ``full(name, key)`` returns one parameter's full tensor (``key`` ``"fp32"`` for the master weight, or an
    optimizer state key such as ``exp_avg``); ``scalars[name]`` its unpartitioned optimizer state (``step``,
    and ``None`` for keys its optimizer kind does not use); ``buffers`` rank 0's module buffers (the visual
    dictionary's codebook and EMA statistics, BatchNorm statistics); ``counters`` the engine's step counters.
    """

    ds_dir: Path
    world_size: int
    stage: int = 0
    pieces: dict[str, list[Piece]] = field(default_factory=dict)
    shapes: dict[str, torch.Size] = field(default_factory=dict)
    tensor_keys: dict[str, list[str]] = field(default_factory=dict)
    scalars: dict[str, dict[str, Any]] = field(default_factory=dict)
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    _flat: dict[str, list[list[torch.Tensor]]] = field(default_factory=dict)  # key -> [rank][group]

    @classmethod
    def open(cls, ds_dir: Path | str, world_size: int) -> ShardedCheckpoint:
        ds_dir = Path(ds_dir)
        if world_size < 1:
            raise ReshardError(f"world_size {world_size} < 1")
        self = cls(ds_dir, world_size)
        optim = []
        for rank in range(world_size):
            path = _one(ds_dir, f"*zero_pp_rank_{rank}_mp_rank_00_optim_states.pt",
                        f"optimizer partition of rank {rank}")
            self.files.append(path)
            sd = _load(path)
            if OPTIMIZER_STATE_DICT not in sd:
                raise ReshardError(f"{path}: no {OPTIMIZER_STATE_DICT}")
            optim.append(sd[OPTIMIZER_STATE_DICT])
        extra = sorted(p.name for p in ds_dir.glob(f"*zero_pp_rank_{world_size}_mp_rank_*_optim_states.pt"))
        if extra:
            raise ReshardError(f"{ds_dir}: holds partitions beyond the {world_size} ranks recorded: {extra}")
        self.stage = _stage_of(optim[0])
        if self.stage == 3:
            model_path = _one(ds_dir, "zero_pp_rank_0_mp_rank_00_model_states.pt", "rank 0 model states")
        else:
            model_path = _one(ds_dir, "mp_rank_00_model_states.pt", "model states")
        self.files.append(model_path)
        model = _load(model_path)
        shapes = model.get(PARAM_SHAPES)
        if not shapes:
            raise ReshardError(f"{model_path}: no {PARAM_SHAPES}")
        for group in shapes:
            for name, shape in group.items():
                self.shapes[name] = torch.Size(shape)
        buffer_names = set(model.get("buffer_names", []))
        self.buffers = {k: v for k, v in model["module"].items() if k in buffer_names}
        self.counters = {k: int(model[k]) for k in ENGINE_COUNTERS if model.get(k) is not None}
        if self.stage == 3:
            self._index_zero3(optim, shapes)
        else:
            self._index_zero12(optim)
        missing = sorted(set(self.shapes) - set(self.pieces))
        if missing:
            raise ReshardError(f"{ds_dir}: no optimizer partition holds {missing[:5]}")
        return self

    def _index_zero12(self, optim: list[dict[str, Any]]) -> None:
        mappings = []
        for rank, sd in enumerate(optim):
            if len(sd.get(PARAM_SLICE_MAPPINGS) or []) != len(optim[0][SINGLE_PARTITION_OF_FP32_GROUPS]):
                raise ReshardError(f"{self.files[rank]}: no {PARAM_SLICE_MAPPINGS} per param group")
            mappings.append(sd[PARAM_SLICE_MAPPINGS])
        self.pieces = zero12_pieces(mappings)
        self._flat[FP32] = [list(sd[SINGLE_PARTITION_OF_FP32_GROUPS]) for sd in optim]
        group_state: list[list[dict[str, Any]]] = []  # [rank][group] -> the flat group's optimizer state
        for rank, sd in enumerate(optim):
            base = sd[BASE_OPTIMIZER_STATE]
            if not isinstance(base, dict) or "state" not in base:
                raise ReshardError(f"{self.files[rank]}: elastic ZeRO checkpoints are not supported")
            per_group = []
            for g, pg in enumerate(base["param_groups"]):
                (pid,) = pg["params"]  # ZeRO-1/2 give the optimizer one flat partition per group
                per_group.append(base["state"].get(pid, {}))
                if g >= len(sd[SINGLE_PARTITION_OF_FP32_GROUPS]):
                    raise ReshardError(f"{self.files[rank]}: more param groups than fp32 partitions")
            group_state.append(per_group)
        # the optimizer's state tensors keep the padding of the last rank's partition; the fp32 copy does not
        self._index_states(group_state,
                           lambda rank, g: (optim[rank][SINGLE_PARTITION_OF_FP32_GROUPS][g].numel()
                                            + int(optim[rank][GROUP_PADDINGS][g])))

    def _index_zero3(self, optim: list[dict[str, Any]], shapes: list[Mapping[str, Any]]) -> None:
        for rank, sd in enumerate(optim):
            count = sd.get("partition_count", self.world_size)
            if int(count) != self.world_size:
                raise ReshardError(f"{self.files[rank]}: partition_count {count}, expected {self.world_size}")
        self.pieces = zero3_pieces(shapes, self.world_size)
        self._flat[FP32] = [list(sd[FP32_FLAT_GROUPS]) for sd in optim]
        group_state = []
        for sd in optim:
            inner = sd[OPTIMIZER_STATE_DICT]
            group_state.append([inner["state"].get(i, {}) for i in range(len(sd[FP32_FLAT_GROUPS]))])
        self._index_states(group_state, lambda rank, g: optim[rank][FP32_FLAT_GROUPS][g].numel())

    def _index_states(self, group_state: list[list[dict[str, Any]]],
                      flat_numel: Callable[[int, int], int]) -> None:
        """Split each flat group's optimizer state into partitioned keys (one element per parameter element,
        assembled like the weights) and scalar keys (``step``; ``None`` for an unused key)."""
        keys_of_group: dict[int, tuple[list[str], dict[str, Any]]] = {}
        for rank, groups in enumerate(group_state):
            for g, state in enumerate(groups):
                tensors = sorted(k for k, v in state.items()
                                 if torch.is_tensor(v) and v.dim() == 1 and v.numel() == flat_numel(rank, g))
                scalars = {k: v for k, v in state.items() if k not in tensors}
                if g not in keys_of_group:
                    keys_of_group[g] = (tensors, scalars)
                    continue
                seen_tensors, seen_scalars = keys_of_group[g]
                if tensors != seen_tensors or not _same_scalars(scalars, seen_scalars):
                    raise ReshardError(
                        f"{self.ds_dir}: optimizer state of group {g} differs between ranks "
                        f"({seen_tensors}, {seen_scalars} vs {tensors}, {scalars} on rank {rank})")
        for key in {k for tensors, _ in keys_of_group.values() for k in tensors}:
            self._flat[key] = [[groups[g].get(key) for g in range(len(groups))] for groups in group_state]
        for name, pieces in self.pieces.items():
            g = pieces[0].group
            tensors, scalars = keys_of_group.get(g, ([], {}))
            self.tensor_keys[name] = list(tensors)
            self.scalars[name] = dict(scalars)

    def full(self, name: str, key: str = FP32) -> torch.Tensor:
        """The full fp32 tensor of ``name``: its master weight (``"fp32"``) or an optimizer state key."""
        if name not in self.pieces:
            raise ReshardError(f"{self.ds_dir}: no parameter {name!r}")
        if key != FP32 and key not in self.tensor_keys[name]:
            raise ReshardError(f"{self.ds_dir}: {name} has no optimizer state {key!r} "
                               f"(has {self.tensor_keys[name]})")
        flat = self._flat[key]
        return assemble(self.pieces[name], lambda rank, g: flat[rank][g], self.shapes[name])

    def part(self, name: str, key: str, start: int, length: int) -> torch.Tensor:
        """Elements ``[start, start + length)`` of ``name``'s flattened full tensor ``key``."""
        flat = self._flat[key]
        return assemble_range(self.pieces[name], lambda rank, g: flat[rank][g], start, length)

    def full_state(self) -> dict[str, dict[str, Any]]:
        """Every parameter's full master weight, partitioned states and scalar states (tests, inspection)."""
        return {name: {FP32: self.full(name), **{k: self.full(name, k) for k in self.tensor_keys[name]},
                       **self.scalars[name]} for name in self.pieces}


def _same_scalars(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    if set(a) != set(b):
        return False
    for k, v in a.items():
        w = b[k]
        if torch.is_tensor(v) and torch.is_tensor(w):
            if not torch.equal(v, w):
                return False
        elif torch.is_tensor(v) or torch.is_tensor(w) or v != w:
            return False
    return True


# --- setting a full state into a freshly built engine of M ranks -----------------------------------------
# What set_full_state uses of DeepSpeed's ZeRO optimizers beyond its public safe_set_* functions (0.19.8).
_NEEDS = {
    "zero3": ("fp32_partitioned_groups_flat", "fp16_groups", "optimizer", "dp_process_group",
              "_reassign_or_swap_out_partitioned_parameters"),
    "zero12": ("single_partition_of_fp32_groups", "bit16_groups", "optimizer",
               "_lazy_init_hp_params_optimizer_state", "update_lp_params"),
    "bf16": ("fp32_groups_flat_partition", "bf16_groups", "optimizer", "_lazy_init_hp_params_optimizer_state",
             "update_lp_params"),
}


def _flat_groups(engine: Any) -> tuple[str, list[torch.Tensor], list[list[torch.nn.Parameter]]]:
    """(kind, the optimizer's flat fp32 partitions, the model parameters of each) of a DeepSpeed engine."""
    opt = engine.optimizer
    if engine.zero_optimization_stage() == 3:
        kind = "zero3"
    elif hasattr(opt, "single_partition_of_fp32_groups"):  # ZeRO-1/2 (DeepSpeedZeroOptimizer)
        kind = "zero12"
    elif hasattr(opt, "fp32_groups_flat_partition"):  # BF16_Optimizer (ZeRO-0 + bf16, where DeepSpeed has it)
        kind = "bf16"
    else:
        raise ReshardError(f"no partitioned optimizer to re-partition into ({type(opt).__name__})")
    missing = [a for a in _NEEDS[kind] if not hasattr(opt, a)]
    if missing:
        import deepspeed

        raise ReshardError(f"DeepSpeed {deepspeed.__version__}: {type(opt).__name__} has no {missing} "
                           "(written for DeepSpeed 0.19.8): resume with the number of workers that wrote the "
                           "checkpoint")
    if kind == "zero3":
        return kind, list(opt.fp32_partitioned_groups_flat), [list(g) for g in opt.fp16_groups]
    if kind == "zero12":
        return kind, list(opt.single_partition_of_fp32_groups), [list(g) for g in opt.bit16_groups]
    return kind, list(opt.fp32_groups_flat_partition), [list(g) for g in opt.bf16_groups]


def _clone_scalar(v: Any) -> Any:
    return v.clone() if torch.is_tensor(v) else v


def _persistent_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The buffers a state dict holds (not ``persistent=False`` ones such as BERT's ``position_ids``)."""
    out = {}
    for prefix, mod in module.named_modules():
        for name, buf in mod.named_buffers(recurse=False):
            if buf is not None and name not in mod._non_persistent_buffers_set:
                out[f"{prefix}.{name}" if prefix else name] = buf
    return out


def set_full_state(engine: Any, src: ShardedCheckpoint) -> dict[str, int]:
    """Write ``src``'s full master weights, optimizer states, buffers and counters into ``engine`` (a freshly
    built DeepSpeed engine of any world size and ZeRO stage 1-3 or ZeRO-0 bf16). Collective: every rank calls
    it. Returns counts for the log."""
    import torch.distributed as dist
    from deepspeed.utils import (
        safe_set_full_fp32_param,
        safe_set_full_optimizer_state,
        safe_set_local_fp32_param,
        safe_set_local_optimizer_state,
    )


    module = unwrap(engine)
    named = dict(module.named_parameters())
    kind, flats, group_params = _flat_groups(engine)
    name_of = {id(p): n for n, p in named.items()}
    in_groups = {name_of[id(p)] for ps in group_params for p in ps}
    missing = sorted(in_groups - set(src.pieces))
    extra = sorted(set(src.pieces) - in_groups)
    if missing or extra:
        raise ReshardError(f"{src.ds_dir}: the checkpoint's parameters differ from this model's "
                           f"(missing {missing[:5]}, unknown {extra[:5]}): same --preset and model options?")
    for name in in_groups:
        if tuple(named[name].ds_shape if hasattr(named[name], "ds_shape") else named[name].shape) \
                != tuple(src.shapes[name]):
            raise ReshardError(f"{src.ds_dir}: {name} has shape {tuple(src.shapes[name])} in the checkpoint")
        if not named[name].requires_grad:
            raise ReshardError(f"{name} is frozen in the model being resumed: cannot set its master weight")
    # 1. the optimizer's state containers, with the checkpoint's keys (a fresh optimizer has none before its
    #    first step); partitioned keys are filled in step 2, scalar keys (step) are the checkpoint's.
    opt = engine.optimizer
    for flat, params in zip(flats, group_params, strict=True):
        names = [name_of[id(p)] for p in params]
        keys = src.tensor_keys[names[0]]
        scalars = src.scalars[names[0]]
        for n in names[1:]:
            if src.tensor_keys[n] != keys or not _same_scalars(src.scalars[n], scalars):
                raise ReshardError(f"{names[0]} and {n} share a param group here but had different optimizer "
                                   "state in the checkpoint (changed param groups or optimizer?)")
        state = opt.optimizer.state[flat]
        state.clear()
        for key, value in scalars.items():
            state[key] = _clone_scalar(value)
        for key in keys:
            state[key] = torch.zeros_like(flat)
    if kind in ("zero12", "bf16"):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()  # the params' views of the new state tensors
    # 2. every parameter's fp32 master weight and partitioned optimizer states: ZeRO-1/2 take the full tensor
    #    and keep their fragment; under ZeRO-3 each rank reads and sets only its own part (DeepSpeed 0.19.8's
    #    safe_set_full_* for ZeRO-3 cannot set a parameter whose size the world size does not divide)
    tensors = 0
    device = flats[0].device
    dp_rank = dist.get_rank(group=opt.dp_process_group) if kind == "zero3" else 0
    for name in sorted(in_groups):
        p = named[name]
        for key in [FP32, *src.tensor_keys[name]]:
            if kind == "zero3":
                part = p.ds_tensor.numel()
                if part != zero3_partition_numel(p.ds_numel, dist.get_world_size(group=opt.dp_process_group)):
                    raise ReshardError(f"{name}: ZeRO-3 partition of {part} elements is not the even split")
                start = dp_rank * part
                valid = max(0, min(part, p.ds_numel - start))
                local = torch.zeros(part, dtype=torch.float32)
                local[:valid] = src.part(name, key, start, valid)
                if key == FP32:
                    safe_set_local_fp32_param(p, local.to(device))
                else:
                    safe_set_local_optimizer_state(p, local.to(device), key)
            elif key == FP32:
                safe_set_full_fp32_param(p, src.full(name).to(device))
            else:
                safe_set_full_optimizer_state(p, src.full(name, key).to(device), key)
            tensors += 1
    # 3. the training-precision weights from the masters (bf16 rounding as after an optimizer step)
    if kind == "zero3":
        for i in range(len(flats)):
            opt._reassign_or_swap_out_partitioned_parameters(i)
    else:
        opt.update_lp_params()
    # 4. buffers: the visual dictionary (codebook + EMA statistics) and BatchNorm statistics, as rank 0 saved
    #    them (DeepSpeed's own resume also gives every rank rank 0's module buffers)
    buffers = _persistent_buffers(module)
    absent = sorted(set(buffers) - set(src.buffers))
    if absent:
        raise ReshardError(f"{src.ds_dir}: the checkpoint has no buffer {absent[:5]}")
    with torch.no_grad():
        for name, buf in buffers.items():
            saved = src.buffers[name]
            if saved.shape != buf.shape:
                raise ReshardError(f"{src.ds_dir}: buffer {name} has shape {tuple(saved.shape)} in the "
                                   f"checkpoint, {tuple(buf.shape)} here")
            buf.copy_(saved.to(buf.dtype))
    for key, value in src.counters.items():
        setattr(engine, key, value)
    return {"params": len(in_groups), "tensors": tensors, "buffers": len(buffers)}


def load_resharded(engine: Any, ckpt_dir: Path, old_world_size: int) -> dict[str, Any]:
    """Load the DeepSpeed state of checkpoint ``ckpt_dir`` (written by ``old_world_size`` ranks) into this
    run's engine of another world size. Collective. ZeRO-0 fp32 holds nothing partitioned: DeepSpeed's own
    loader reads it at any world size (weights-only). Returns what was done, for the log."""

    t0 = time.perf_counter()
    ds_dir = Path(ckpt_dir) / DS_TAG
    if engine.zero_optimization_stage() == 0 and not any(ds_dir.glob("*zero_pp_rank_*_optim_states.pt")):
        with weights_only_loads():
            load_path, _ = engine.load_checkpoint(str(ckpt_dir), tag=DS_TAG, load_optimizer_states=True,
                                                  load_lr_scheduler_states=False)
        if load_path is None:
            raise ReshardError(f"DeepSpeed could not load {ckpt_dir}")
        return {"method": "DeepSpeed's own loader (ZeRO-0: nothing partitioned)",
                "seconds": time.perf_counter() - t0}
    if engine.fp16_enabled():
        raise ReshardError("re-partitioning an fp16 checkpoint (loss-scaler state) is not supported: resume "
                           "it with the number of workers that wrote it, or train in bf16/fp32")
    src = ShardedCheckpoint.open(ds_dir, old_world_size)
    counts = set_full_state(engine, src)
    return {"method": f"consolidated ZeRO-{src.stage} state of {old_world_size} ranks", **counts,
            "bytes_read": sum(p.stat().st_size for p in src.files), "seconds": time.perf_counter() - t0}


def derived_seed(seed: int, step: int, rank: int) -> int:
    """The RNG seed of a rank that did not exist when the checkpoint was written."""
    return (seed * 1_000_003 + step * 7919 + rank * 104_729 + 17) % (2**63 - 1)


def restore_rng(records: Iterable[Mapping[str, Any]], rank: int, seed: int, step: int) -> str:
    """RNG state after a world-size change: a rank that existed takes its own saved state; a new rank derives
    its own from (seed, step, rank). Returns which, for the log."""

    records = list(records)
    if rank < len(records):
        set_rng_state(records[rank]["rng"])
        return f"rank {rank}'s saved RNG state"
    s = derived_seed(seed, step, rank)
    torch.manual_seed(s)  # also seeds every CUDA device
    return f"a new RNG stream (seed {s} from seed {seed}, step {step}, rank {rank})"


def resume_other_world(engine: Any, loader: Any, ckpt_dir: Path, *, old_world_size: int, rank: int,
                       world_size: int, seed: int, step: int) -> dict[str, Any]:
    """Everything one rank restores from a verified checkpoint written by ``old_world_size`` ranks into this
    run of ``world_size``: the engine state (:func:`load_resharded`; collective), the data position (every old
    rank's loader state, in old rank order, handed to ``loader.load_states_from``) and the RNG
    (:func:`restore_rng`). Returns the old rank record whose visual-dictionary checksum this rank checks (its
    own, or rank 0's for a new rank: every rank saved the same codebook)."""
    import pickle


    if rank == 0:
        logger.info("checkpoint step %d was written by %d workers; re-partitioning for %d", step,
                    old_world_size, world_size)
    try:
        info = load_resharded(engine, ckpt_dir, old_world_size)
    except pickle.UnpicklingError as exc:
        raise UntrustedCheckpointError(
            f"{ckpt_dir}: a DeepSpeed file was refused by the weights-only loader while re-partitioning "
            f"(changed after verification?): {str(exc).strip().splitlines()[0][:300]}") from exc
    records = [read_rank_record(ckpt_dir, r) for r in range(old_world_size)]
    load_states_from = getattr(loader, "load_states_from", None)
    if load_states_from is None:
        raise ReshardError(f"{type(loader).__name__} cannot take the loader states of {old_world_size} old "
                           "ranks (no load_states_from): resume with the number of workers that wrote it")
    load_states_from([r["loader_state"] for r in records])
    rng = restore_rng(records, rank, seed, step)
    if rank == 0:
        read = f", {info['bytes_read'] / 1e6:.1f} MB read" if "bytes_read" in info else ""
        logger.info("re-partitioned step %d from %d to %d workers in %.2f s (%s%s); rank 0 continues with %s",
                    step, old_world_size, world_size, info["seconds"], info["method"], read, rng)
    return records[rank] if rank < old_world_size else records[0]
