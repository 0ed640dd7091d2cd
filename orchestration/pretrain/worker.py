"""The per-worker training loop. It knows nothing about Ray.

``train_loop(cfg, store, data_url)`` runs on an already initialised ``torch.distributed`` process group
(Ray Train's, torchrun's, the deepspeed launcher's) or, when none exists, makes a one-process gloo group
itself — so tests and the GPU benchmark call it in one process. Per step: batch → ``SohoForPretraining`` →
{mlm, mvm, itm} losses → DeepSpeed backward/step; the visual dictionary sums its EMA statistics over ranks
with ``torch.distributed.all_reduce`` (its ``reduce_fn``) so every rank holds the same codebook; every
``checkpoint_every`` steps a committed checkpoint (see :mod:`orchestration.runtime.checkpoint`).
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from fsspec.utils import get_protocol

from data_pipeline.loader import LoaderConfig, PretrainLoader, images_to_batch
from orchestration.pretrain.config import RunConfig
from orchestration.pretrain.heldout_eval import periodic_heldout_eval
from orchestration.pretrain.init_from import engine_checksums, warm_start, write_record
from orchestration.runtime import faults
from orchestration.runtime.checkpoint import (
    DS_TAG,
    EXPORT_DIR,
    HISTORY_DIR,
    STATE_FORMAT,
    CheckpointStore,
    HistoryLog,
    LocalCheckpoint,
    Staging,
    UntrustedCheckpointError,
    read_rank_record,
    weights_only_loads,
)
from orchestration.runtime.distributed import (
    all_agree,
    consolidated_fp32_state_dict,
    destroy_process_group,
    ensure_process_group,
    rng_state,
    set_rng_state,
    step_generator,
    sum_over_ranks,
    tensor_sha256,
    unwrap,
    visual_dictionary,
)
from orchestration.runtime.engine import build_engine
from orchestration.runtime.engine_checkpoint import commit_checkpoint, save_engine_state
from orchestration.runtime.loggers import RunLogger
from orchestration.runtime.metrics import SohoMetrics
from orchestration.runtime.reshard import resume_other_world
from orchestration.runtime.schedule import apply_lr, backbone_frozen
from soho import SohoForPretraining

logger = logging.getLogger(__name__)

LOSS_KEYS = ("loss", "mlm", "mvm", "itm", "itc")  # itc: 0 unless pretrain.itc_weight > 0
ACC_KEYS = ("mlm_acc", "mvm_acc", "itm_acc", "itc_acc")
HISTORY_TAIL = 10_000  # step records a worker keeps in memory once they are in the history log


_DATA_END = 2**62  # the "epoch" of a rank whose loader has no batch left


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a NaN/Inf loss or NaN/Inf gradients: the run is diverging."""


class NonFiniteWeightsError(RuntimeError):
    """Some rank holds NaN/Inf weights: refusing to commit a checkpoint of them."""


class _NaNGradient(torch.autograd.Function):
    """Test-only fault: identity forward, NaN backward (a finite loss whose gradients are not finite)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("nan")


@dataclass
class WorkerResult:
    """What one rank reports at the end. ``history``: this attempt's steps (the newest ``HISTORY_TAIL`` of
    them); the run's full history is in the history log
    (:func:`orchestration.runtime.checkpoint.read_history`)."""

    rank: int
    world_size: int
    step: int
    start_step: int
    samples_seen: int
    nonfinite_steps: int
    history: list[dict[str, float]] = field(default_factory=list)
    resumes: list[dict[str, int]] = field(default_factory=list)
    codebook_sha256: str = ""
    metrics_port: int | None = None
    vd_buffer_dtypes: dict[str, str] = field(default_factory=dict)
    param_dtype: str = ""


def open_run_logger(cfg: RunConfig, rank: int, start_step: int) -> RunLogger:
    """The TensorBoard / W&B logger of a pre-training run on ``rank``, resuming at ``start_step``."""
    obs = cfg.observability
    tb = obs.tensorboard_dir
    opts = cfg.storage_options() if tb and get_protocol(tb) in ("s3", "s3a") else {}
    return RunLogger(run_name=cfg.name, rank=rank, tensorboard_dir=tb, wandb_project=obs.wandb_project,
                     start_step=start_step, storage_options=opts,
                     config={**cfg.to_dict(), "run_name": cfg.name},
                     wandb_id_seed=f"{cfg.checkpoint.storage_path.rstrip('/')}/{cfg.name}")


# --- the loop ---------------------------------------------------------------------------------------
class _Trainer:
    """State of one rank's training; methods are the phases of ``train_loop``."""

    def __init__(self, cfg: RunConfig, store: CheckpointStore, data_url: str, under_ray: bool) -> None:
        self.cfg, self.store, self.data_url, self.under_ray = cfg, store, data_url, under_ray
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))
        self.device = torch.device(f"cuda:{self.local_rank}" if cfg.scale.use_gpu else "cpu")
        self.step = 0
        self.batches_seen = 0
        self.samples_seen = 0
        self.nonfinite_total = 0
        self.consecutive_nonfinite = 0
        self.history: list[dict[str, float]] = []  # this attempt's steps; the run's are in the history log
        self._history_saved = 0  # records of self.history already in the history log
        self.history_log = HistoryLog.for_run(cfg.checkpoint.storage_path, cfg.name, cfg.storage_options())
        if getattr(store, "staging", None) is None:
            store.staging = Staging(cfg.checkpoint.storage_path, cfg.name, self.rank)
        self.staging: Staging = store.staging  # type: ignore[assignment]
        self._grads_skipped = False
        self.resumes: list[dict[str, int]] = []
        self.start_step = 0
        self.frozen: bool | None = None
        # disabled until run() opens the real one
        self.run_logger = RunLogger(run_name=cfg.name, rank=self.rank)
        self.fault_site = faults.FaultSite(cfg.faults, cfg.checkpoint.storage_path, cfg.name,
                                           cfg.storage_options())
        # this rank's first sample keys (tests check ranks read different data)
        self._first_keys: list[str] = []

    # --- set-up ---------------------------------------------------------------------------------
    def build(self) -> None:
        cfg = self.cfg
        model_cfg = cfg.model_config()  # preset + backbone_weights + vd_decay + model_overrides
        self.model_cfg = model_cfg
        # Same seed on every rank: identical initial weights and codebook before DeepSpeed's broadcast.
        torch.manual_seed(cfg.seed)
        # --init-from: no trunk/BERT download, every tensor comes from the source (unless the run resumes)
        model = SohoForPretraining(model_cfg, load_pretrained=cfg.init_from is None)
        self.init_from: dict[str, Any] | None = None  # train_state / summary "init_from"
        self._init_from_skipped = False
        if cfg.init_from:  # before the engine: DeepSpeed makes its fp32 masters / ZeRO-3 partitions of them
            self.init_from, self._init_from_skipped = warm_start(model, cfg, self.store, self.staging,
                                                                 self.rank)
        if self.world_size > 1:
            model.soho.visual_dictionary.reduce_fn = sum_over_ranks
        built = build_engine(model, cfg.optim, cfg.scale, self.world_size)
        self.built = built
        self.engine, self.group_specs, self.ds_config = built.engine, built.group_specs, built.ds_config
        self.model_dtype = built.dtype
        if self.init_from is not None and not self._init_from_skipped:
            self._check_warm_start()
        data = cfg.dataset
        self.loader = PretrainLoader(
            LoaderConfig(
                urls=self.data_url,
                batch_size=cfg.scale.micro_batch_size,
                max_image_side=data.image_size,
                pad_multiple=model_cfg.encoder.total_stride,
                max_text_len=data.max_text_len,
                resampled=data.use_resampled,
                epochs=data.epochs,
                seed=cfg.seed,
                num_workers=data.loader_workers,
                verify=data.verify_data,
                storage_options=cfg.storage_options(),
                pin_memory=cfg.scale.use_gpu,
                gpu_decode=data.gpu_decode,
                text_augment=data.text_augment(),
                caption_choice=data.caption_mode,
            ),
            rank=self.rank,
            world_size=self.world_size,
        )
        self.metrics = SohoMetrics(rank=self.rank)
        self.metrics.set_info({**cfg.to_dict(), "run_name": cfg.name})
        self.metrics.set_vd_num_codes(model_cfg.vd.num_codes)
        self.metrics_port: int | None = None
        port = cfg.observability.metrics_port
        if port >= 0:
            self.metrics_port = self.metrics.start_http_server(port + self.local_rank if port > 0 else 0)

    def _check_warm_start(self) -> None:
        """Record what the engine holds at step 0 (collective); in fp32 it must be the source exactly."""
        assert self.init_from is not None
        cfg = self.cfg
        self.init_from.update(engine_checksums(self.engine))
        same = self.init_from["weights_sha256"] == self.init_from["source_sha256"]
        if cfg.scale.precision == "fp32" and not same:
            raise RuntimeError(f"--init-from {cfg.init_from}: the engine's fp32 weights at step 0 differ "
                               "from the source's after loading (checksums)")
        if self.rank == 0:
            write_record(cfg.checkpoint.storage_path, cfg.name, cfg.storage_options(), self.init_from)

    def _all_agree(self, ok: bool) -> bool:
        return all_agree(ok, self.device)

    # --- trainer state: what a checkpoint's train_state.json restores ---------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The run-level counters every rank shares (rank 0 writes them as ``train_state.json``)."""
        return {
            "step": self.step,
            "batches_seen": self.batches_seen,
            "samples_seen": self.samples_seen,
            "nonfinite_steps": self.nonfinite_total,
            "world_size": self.world_size,
            "resumes": list(self.resumes),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`. A checkpoint of another world size is accepted: :meth:`resume`
        re-partitions it (``ckpt_world_size``)."""
        self.ckpt_world_size = int(state["world_size"])
        self.step = int(state["step"])
        self.batches_seen = int(state["batches_seen"])
        self.samples_seen = int(state["samples_seen"])
        self.nonfinite_total = int(state["nonfinite_steps"])
        resume: dict[str, int] = {"from_step": self.step, "first_step": -1}
        if self.ckpt_world_size != self.world_size:
            resume.update(from_world_size=self.ckpt_world_size, world_size=self.world_size)
        self.resumes = [*state["resumes"], resume]

    def rank_state_dict(self) -> dict[str, Any]:
        """What only this rank knows: its loader position and RNG (its checkpoint rank record)."""
        return {"loader_state": self.loader.state_dict(), "rng": rng_state()}

    def load_rank_state_dict(self, record: dict[str, Any]) -> None:
        self.loader.load_state_dict(record["loader_state"])
        set_rng_state(record["rng"])

    def resume(self) -> None:
        # Every rank verifies each candidate (sizes, sha256, weights-only test load) and all ranks vote, so
        # they fall back together: the newest checkpoint that every rank could verify wins.
        ckpt: LocalCheckpoint | None = self.store.latest(agree=self._all_agree)
        if ckpt is None:
            if self.rank == 0:
                self.history_log.truncate_after(0)
                logger.info("no committed checkpoint in %s: starting at step 0", self.store.describe())
            return
        try:
            state = ckpt.state
            self.load_state_dict(state)  # the run-level counters first
            if self.ckpt_world_size != self.world_size:  # written by another number of workers
                record = resume_other_world(self.engine, self.loader, ckpt.path,
                                            old_world_size=self.ckpt_world_size, rank=self.rank,
                                            world_size=self.world_size, seed=self.cfg.seed, step=self.step)
            else:
                # DeepSpeed's loader calls torch.load(weights_only=False); forced weights-only here
                # (allow-listed DeepSpeed types), so even a file swapped after verification cannot run code.
                # State files are JSON.
                try:
                    with weights_only_loads():
                        load_path, _ = self.engine.load_checkpoint(str(ckpt.path), tag=DS_TAG,
                                                                   load_optimizer_states=True,
                                                                   load_lr_scheduler_states=False)
                except pickle.UnpicklingError as exc:
                    raise UntrustedCheckpointError(
                        f"{ckpt.source}: a DeepSpeed file was refused by the weights-only loader while "
                        f"loading (changed after verification?): {str(exc).strip().splitlines()[0][:300]}"
                    ) from exc
                if load_path is None:
                    raise RuntimeError(f"DeepSpeed could not load {ckpt.source}")
                record = read_rank_record(ckpt.path, self.rank)
                self.load_rank_state_dict(record)
            if self.rank == 0:
                self.history_log.truncate_after(self.step)  # steps of an attempt that never committed
                if "history" in state and not self.history_log.segments():  # a format-1 checkpoint
                    self.history_log.append([r for r in state["history"] if int(r["step"]) <= self.step])
            if tensor_sha256(visual_dictionary(self.engine).codebook) != record["vd_codebook_sha256"]:
                raise RuntimeError(
                    f"{ckpt.source}: visual dictionary differs from the checksum saved with it")
            if self.rank == 0:
                logger.info("resumed from %s at step %d (%d samples seen)", ckpt.source, self.step,
                            self.samples_seen)
        finally:
            ckpt.cleanup()

    # --- data: every rank trains on a batch, or none does -------------------------------------------
    # In epoch mode the shards split unevenly over ranks (7 samples in 4 shards over 2 ranks: 4 and 3
    # batches), so ranks run dry at different steps; a rank that stopped alone would leave the others in a
    # collective forever. Before each micro-batch the ranks agree (one all-reduce of one integer, MAX of the
    # epoch of each rank's next batch) whether every rank still has a batch of the current epoch. If one does
    # not, that epoch ends for all: ranks with batches left skip to the next epoch (the rest of their share is
    # left out of this epoch, at most about one shard per rank, like DistributedSampler's drop_last), and the
    # run ends together after the last epoch. The agreed epoch is also the one that drives the cold start.
    _pending: tuple[dict[str, Any] | None, int] | None = None  # fetched, not yet agreed: (batch, its epoch)
    _ready = False  # _pending holds the agreed next micro-batch (or None: the data ended on every rank)
    data_epoch = 0  # the epoch every rank is in (drives the cold start)

    def _start_data(self) -> None:
        self._it = iter(self.loader)
        self._pending, self._ready = None, False
        epoch = torch.tensor([int(self.loader.epoch)], dtype=torch.int64, device=self.device)
        if self.world_size > 1:  # resumed ranks saved the same epoch; MIN makes sure of it
            dist.all_reduce(epoch, op=dist.ReduceOp.MIN)
        self.data_epoch = int(epoch.item())

    def _fetch(self) -> tuple[dict[str, Any] | None, int]:
        try:
            batch = next(self._it)
        except StopIteration:
            return None, _DATA_END
        return batch, int(self.loader.epoch)  # the epoch the batch belongs to

    def _skip_to_epoch(self, epoch: int) -> None:
        """Leave the rest of this rank's current epoch unread and start ``epoch`` (through the loader's own
        resumable state, so a checkpoint taken afterwards resumes in ``epoch``)."""
        close = getattr(self._it, "close", None)
        if close is not None:
            close()  # stops the loader's DataLoader workers of the abandoned epoch
        state = self.loader.state_dict()
        state.update(epoch=epoch, positions={}, next_worker=0)
        self.loader.load_state_dict(state)
        self._it = iter(self.loader)
        self._pending = None

    def _agree_on_batch(self) -> None:
        """Settle the next micro-batch on every rank: afterwards ``_pending`` holds a batch of ``data_epoch``
        on every rank, or None on every rank (the run's data ended)."""
        if self._ready:
            return
        limit = self.cfg.dataset.epochs if not self.cfg.dataset.use_resampled else None
        while True:
            if self._pending is None:
                self._pending = self._fetch()
            newest = torch.tensor([self._pending[1]], dtype=torch.int64, device=self.device)
            if self.world_size > 1:
                dist.all_reduce(newest, op=dist.ReduceOp.MAX)
            newest_epoch = int(newest.item())
            if newest_epoch == self.data_epoch:  # every rank has a batch of the agreed epoch
                self._ready = True
                return
            # some rank ran out of this epoch's data: the epoch ends on every rank at this step
            ended = self.data_epoch
            self.data_epoch += 1
            if ((limit is not None and self.data_epoch >= limit)
                    or (limit is None and newest_epoch == _DATA_END)):
                if self.rank == 0:
                    logger.info("step %d: the data ended on a rank after %d epoch(s): every rank stops",
                                self.step, self.data_epoch)
                self._pending, self._ready = (None, _DATA_END), True
                return
            if self._pending[1] < self.data_epoch:
                logger.info("rank %d, step %d: epoch %d ended on another rank; skipping the rest of this "
                            "rank's share of it", self.rank, self.step, ended)
                self._skip_to_epoch(self.data_epoch)

    def _next_batch(self) -> dict[str, Any] | None:
        """Next micro-batch, or None on every rank at once when the data ran out (``--epochs`` reached)."""
        self._agree_on_batch()
        assert self._pending is not None
        batch = self._pending[0]
        if batch is not None:
            self._pending, self._ready = None, False
        return batch

    # --- one step ---------------------------------------------------------------------------------
    def _set_cold_start(self) -> None:
        self._agree_on_batch()  # the agreed epoch of this step's first batch drives an epoch cold start
        frozen = backbone_frozen(self.cfg.optim, self.step, self.data_epoch)
        if frozen != self.frozen:
            unwrap(self.engine).soho.set_backbone_trainable(not frozen)
            if self.rank == 0:
                logger.info("step %d: ResNet trunk %s", self.step,
                            "frozen (cold start)" if frozen else "trainable")
            self.frozen = frozen
        self.lr = apply_lr(self.engine.optimizer, self.group_specs, self.cfg.optim, self.step, frozen)

    def _micro_step(self, batch: dict[str, Any]) -> torch.Tensor | None:
        """Forward, global finiteness check, backward. Returns the rank-averaged [loss, mlm, mvm, itm, accs]
        or None when the micro-batch was skipped because some rank's loss was not finite."""
        vd = visual_dictionary(self.engine)
        # The VD updates its codebook inside forward; keep a copy so a non-finite step can be undone.
        vd_backup = {k: v.clone() for k, v in vd.state_dict().items()}
        self._vd_backup = vd_backup  # train_step keeps the one of its first micro-batch (no second copy)
        if "images" in batch:  # --gpu-decode: JPEG bytes, decoded, resized and padded on this device
            pv, pmask = images_to_batch(batch["images"], self.cfg.dataset.image_size,
                                        self.model_cfg.encoder.total_stride, self.device)
        else:  # uint8 (the encoder normalises on the device); pinned when use_gpu, so the copy is async
            pv = batch["pixel_values"].to(self.device, non_blocking=True)
            pmask = batch["pixel_mask"].to(self.device, non_blocking=True)
        if pv.is_floating_point() and self.model_dtype != torch.float32:
            pv = pv.to(self.model_dtype)
        out = self.engine(
            pv,
            pmask,
            batch["input_ids"].to(self.device, non_blocking=True),
            batch["attention_mask"].to(self.device, non_blocking=True),
            generator=step_generator(self.cfg.seed, self.batches_seen, self.rank),
        )
        loss = out.loss
        if self.batches_seen in self.cfg.faults.fault_nonfinite_batches:
            loss = loss * float("nan")  # test-only fault: a poisoned batch
        if self.batches_seen in self.cfg.faults.fault_nonfinite_grad_batches:
            loss = _NaNGradient.apply(loss)  # test-only fault: finite loss, NaN gradients
        stats = torch.stack([loss.detach().float(), out.mlm_loss.detach().float(),
                             out.mvm_loss.detach().float(), out.itm_loss.detach().float(),
                             out.itc_loss.detach().float(), out.mlm_acc.float(), out.mvm_acc.float(),
                             out.itm_acc.float(), out.itc_acc.float()])
        # One small all-reduce per micro-batch gives both the global loss for logging and the global
        # decision to skip: every rank must skip together or ZeRO's gradient reduction would deadlock.
        if self.world_size > 1:
            dist.all_reduce(stats, op=dist.ReduceOp.SUM)
            stats /= self.world_size
        self.batches_seen += 1
        self._grads_skipped = False
        if not torch.isfinite(stats[: len(LOSS_KEYS)]).all():
            vd.load_state_dict(vd_backup)
            self._count_nonfinite("non-finite loss")
            return None
        self.engine.backward(loss)
        boundary = self.engine.is_gradient_accumulation_boundary()
        dropped = boundary and self._drop_nonfinite_grads()
        if dropped:  # DeepSpeed's micro-step bookkeeping runs, our optimizer's step does not
            opt = self.engine.optimizer
            opt.step = lambda *args, **kwargs: None  # instance attribute shadows the method for this call
            try:
                self.engine.step()
            finally:
                del opt.step
        else:
            self.engine.step()
        # The optimizer step ran only if the gradients were finite on every rank: ours (dropped) or
        # DeepSpeed's own check of the all-reduced global gradient norm (ZeRO-1/2/3, bf16), which skips the
        # step itself.
        self._grads_skipped = boundary and (dropped or self._engine_skipped_step())
        return stats

    def _count_nonfinite(self, what: str) -> None:
        self.nonfinite_total += 1
        self.consecutive_nonfinite += 1
        self.metrics.inc_nonfinite()
        logger.warning("rank %d: %s at step %d (batch %d): step skipped, %d in a row",
                       self.rank, what, self.step + 1, self.batches_seen - 1, self.consecutive_nonfinite)
        if self.consecutive_nonfinite >= self.cfg.faults.max_consecutive_nonfinite:
            raise NonFiniteLossError(
                f"aborting at step {self.step + 1}: {self.consecutive_nonfinite} consecutive steps had a "
                f"non-finite loss or non-finite gradients (last: {what}; "
                f"--max-consecutive-nonfinite {self.cfg.faults.max_consecutive_nonfinite}); lower --lr, "
                "use --precision fp32, or check the data"
            )

    def _drop_nonfinite_grads(self) -> bool:
        """Where DeepSpeed hands the gradients straight to our optimizer (ZeRO-0 fp32: no DeepSpeed optimizer
        wrapper, no check), look at them after backward and before ``engine.step()``: if any rank has a
        NaN/Inf gradient (one all-reduce of a flag), every rank zeroes its gradients and the caller runs
        ``engine.step()`` with the optimizer's step disabled: neither weights nor optimizer state change."""
        if hasattr(self.engine.optimizer, "overflow"):
            # DeepSpeed's wrapper checks the global gradient norm itself (see _engine_skipped_step)
            return False
        params = [p for p in unwrap(self.engine).parameters() if p.grad is not None]
        local_ok = True
        if params:
            norms = torch._foreach_norm([p.grad for p in params])
            local_ok = bool(torch.isfinite(torch.stack(norms)).all())
        if self._all_agree(local_ok):
            return False
        for p in params:
            p.grad.zero_()  # DeepSpeed's gradient clipping still runs over them
        return True

    def _engine_skipped_step(self) -> bool:
        """DeepSpeed's optimizer wrappers set ``overflow`` when they skipped the step for a non-finite global
        gradient norm (all-reduced, so every rank agrees). Under fp16 that is also the loss scaler's normal
        scale search, which is not counted."""
        if self.cfg.scale.precision == "fp16":
            return False
        return bool(getattr(self.engine.optimizer, "overflow", False))

    def train_step(self) -> bool:
        """One optimizer step (grad_accum finite micro-batches). False when the data ran out."""
        # The step's time starts before its first batch is asked for (the bare loop of
        # benchmarks/orchestration_overhead.py times the same), and that fetch counts as data wait.
        t0 = time.perf_counter()
        self._agree_on_batch()  # the step's first micro-batch (_set_cold_start needs its agreed epoch)
        wait = time.perf_counter() - t0
        self._set_cold_start()
        acc: torch.Tensor | None = None
        done = 0
        vd = visual_dictionary(self.engine)
        step_vd: dict[str, torch.Tensor] = {}  # the VD before the step: undone when the step is skipped
        while done < self.cfg.scale.grad_accum:
            tw = time.perf_counter()
            batch = self._next_batch()
            wait += time.perf_counter() - tw
            if batch is None:
                return False
            if not self._first_keys:
                self._first_keys = list(batch.get("keys", []))[:8]
            stats = self._micro_step(batch)
            if stats is None:
                continue  # skipped: no backward, no DeepSpeed micro-step; the next batch takes its place
            if done == 0:  # the copy _micro_step took before this step's first counted forward
                step_vd = self._vd_backup
            if self._grads_skipped:  # the optimizer step did not happen: start the step over
                vd.load_state_dict(step_vd)
                acc, done = None, 0
                self._count_nonfinite("non-finite gradients (finite loss)")
                continue
            acc = stats if acc is None else acc + stats
            done += 1
        assert acc is not None
        acc /= self.cfg.scale.grad_accum
        self.consecutive_nonfinite = 0
        self.step += 1
        step_samples = self.cfg.scale.micro_batch_size * self.cfg.scale.grad_accum * self.world_size
        self.samples_seen += step_samples
        seconds = time.perf_counter() - t0
        vals = dict(zip(LOSS_KEYS + ACC_KEYS, acc.tolist(), strict=True))
        health = visual_dictionary(self.engine).health()
        losses = {"total": vals["loss"], "mlm": vals["mlm"], "mvm": vals["mvm"], "itm": vals["itm"]}
        if self.model_cfg.pretrain.itc_weight > 0:
            losses["itc"] = vals["itc"]
        self.metrics.observe_step(losses,
                                  samples=self.cfg.scale.micro_batch_size * self.cfg.scale.grad_accum,
                                  step_seconds=seconds, data_wait_seconds=wait)
        self.metrics.set_vd_health(health)
        if hasattr(self.loader, "bad_sample_counts"):
            self.metrics.set_bad_samples(self.loader.bad_sample_counts())
        if self.resumes and self.resumes[-1]["first_step"] == -1:
            self.resumes[-1]["first_step"] = self.step
        record = {"step": self.step, **{k: round(v, 5) for k, v in vals.items()},
                  "vd_usage": round(float(health["usage_ratio"]), 5),
                  "vd_perplexity": round(float(health["perplexity"]), 4),
                  "vd_dead_codes": int(health["dead_codes"]), "vd_decay": round(float(health["decay"]), 6),
                  "lr": self.lr, "samples_per_s": round(step_samples / max(seconds, 1e-9), 2),
                  "step_s": round(seconds, 4), "data_wait_s": round(wait, 4)}
        self.history.append(record)
        self.run_logger.log_step(self.step, record, itc="itc" in losses)  # TensorBoard/W&B (rank 0; opt-in)
        if self.rank == 0 and (self.step % self.cfg.observability.log_every == 0 or self.step == 1
                               or self.step == self.cfg.optim.max_steps):
            itc = f" itc {vals['itc']:.4f}" if "itc" in losses else ""
            logger.info(
                "step %d/%d  loss %.4f (mlm %.4f mvm %.4f itm %.4f%s)  itm_acc %.2f  %.1f samples/s  "
                "VD usage %.2f perplexity %.1f",
                self.step, self.cfg.optim.max_steps, vals["loss"], vals["mlm"], vals["mvm"], vals["itm"], itc,
                vals["itm_acc"], record["samples_per_s"], health["usage_ratio"], health["perplexity"],
            )
        return True

    # --- checkpoint ----------------------------------------------------------------------------
    def _nonfinite_weights(self) -> str:
        """Name of the first local tensor (parameter, ZeRO-3 partition, fp32 master partition, buffer) that
        holds NaN/Inf, or ''."""
        module = unwrap(self.engine)
        for name, p in module.named_parameters():
            t = getattr(p, "ds_tensor", None)
            t = p if t is None else t
            if t.numel() and not bool(torch.isfinite(t.detach()).all()):
                return name
        for name, b in module.named_buffers():
            if b.is_floating_point() and b.numel() and not bool(torch.isfinite(b).all()):
                return name
        opt = self.engine.optimizer
        for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat",
                     "fp32_groups_flat_partition"):
            for i, t in enumerate(getattr(opt, attr, None) or []):
                if isinstance(t, torch.Tensor) and t.numel() and not bool(torch.isfinite(t.detach()).all()):
                    return f"optimizer.{attr}[{i}]"
        return ""

    def _check_weights_finite(self) -> None:
        """Collective: refuse to write a checkpoint when any rank's weights are not finite."""
        bad = self._nonfinite_weights()
        if not self._all_agree(not bad):
            where = f"this rank holds NaN/Inf in {bad}" if bad else "another rank holds NaN/Inf weights"
            raise NonFiniteWeightsError(
                f"step {self.step}: not committing a checkpoint with non-finite weights (rank {self.rank}: "
                f"{where}); the last committed checkpoint stays the one to resume from")

    def save_checkpoint(self, final: bool) -> None:
        t0 = time.perf_counter()
        self._check_weights_finite()
        local = self.staging.new(f"ckpt-{self.step}")
        try:
            save_engine_state(self.built, local, self.rank)
            if final:
                state_dict = consolidated_fp32_state_dict(self.engine)  # collective
                if self.rank == 0:
                    self._check_consolidated(state_dict)
                    self._export(state_dict, local / EXPORT_DIR)
            codebook_sha = tensor_sha256(visual_dictionary(self.engine).codebook)
            last = self.history[-1] if self.history else {}
            commit_checkpoint(
                self.store, local, self.step, rank=self.rank, world_size=self.world_size,
                train_state=self._train_state(codebook_sha),
                rank_record={
                    **self.rank_state_dict(),
                    "vd_codebook_sha256": codebook_sha,
                    "step": self.step,
                    "metrics_port": self.metrics_port,
                    "vd_buffer_dtypes": {k: str(v.dtype)
                                         for k, v in visual_dictionary(self.engine).state_dict().items()},
                    "param_dtype": str(next(unwrap(self.engine).parameters()).dtype),
                    "first_keys": self._first_keys,
                },
                metrics={"step": self.step, "samples_seen": self.samples_seen,
                         "loss": last.get("loss", float("nan")), "final": final},
                before_upload=self._flush_history_segment,
                before_commit=lambda: faults.maybe_crash_during_checkpoint(self.fault_site, self.step,
                                                                          self.rank))
        finally:
            shutil.rmtree(local, ignore_errors=True)
        self._history_saved = len(self.history)
        if len(self.history) > HISTORY_TAIL:  # memory stays bounded too: the log has the rest
            drop = len(self.history) - HISTORY_TAIL
            del self.history[:drop]
            self._history_saved -= drop
        seconds = time.perf_counter() - t0
        self.metrics.observe_checkpoint(self.step, seconds)
        if self.rank == 0:
            logger.info("checkpoint at step %d committed to %s in %.1f s", self.step, self.store.describe(),
                        seconds)
        faults.maybe_kill_after_checkpoint(self.fault_site, self.step, self.rank, self.under_ray)

    def _flush_history_segment(self) -> None:
        """Rank 0, before the upload: the steps since the last checkpoint go to the history log (and the
        TensorBoard events to disk), so a committed checkpoint never lacks its steps."""
        if self.rank == 0:
            self.history_log.append(self.history[self._history_saved:])
            self.run_logger.flush()

    def _train_state(self, codebook_sha: str) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            **self.state_dict(),
            "seeds": {"seed": self.cfg.seed, "masking": "step_generator(seed, batch_index, rank)"},
            "config": {**self.cfg.to_dict(), "run_name": self.cfg.name},
            "model_config": self.model_cfg.to_dict(),
            "deepspeed_config": self.ds_config,
            "history_log": f"{HISTORY_DIR}/ beside the checkpoints "
                           "(orchestration.runtime.checkpoint.read_history)",
            "vd_codebook_sha256": codebook_sha,
            "init_from": self.init_from,
            "time": time.time(),
        }

    def _check_consolidated(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Where the engine holds full parameters (ZeRO < 3), the fp32 masters rounded to the training dtype
        must be exactly those parameters: a cheap guard against exporting the wrong tensors."""
        if self.engine.zero_optimization_stage() >= 3:
            return
        for name, p in unwrap(self.engine).named_parameters():
            if not torch.equal(state_dict[name].to(p.dtype), p.detach().cpu()):
                raise RuntimeError(
                    f"export: consolidated fp32 weight {name} does not match the engine's parameter")

    def _export(self, state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
        """Consolidated fp32 ``SohoForPretraining`` (``SohoModel.from_pretrained`` loads its backbone)."""
        fresh = SohoForPretraining(self.model_cfg)
        expected = fresh.state_dict()
        missing = sorted(set(expected) - set(state_dict))
        if missing:
            raise RuntimeError(f"export: consolidated weights miss {missing[:5]}")
        fresh.load_state_dict({k: state_dict[k].to(expected[k].dtype) for k in expected}, strict=True)
        fresh.save_pretrained(str(out_dir))

    # --- driver --------------------------------------------------------------------------------------
    def run(self) -> WorkerResult:
        self.staging.remove_stale()  # what a killed attempt of this rank of this run left in the temp dir
        self.build()
        self.resume()
        if self._init_from_skipped and self.step == 0:  # the checkpoints that made build() skip it all failed
            raise RuntimeError(
                f"--init-from {self.cfg.init_from} was skipped because run {self.cfg.name} has committed "
                "checkpoints, but none of them could be verified (see the log): not starting from random "
                "weights; remove them or use another --run-name")
        self.start_step = self.step
        # rank 0 only; a resumed attempt purges what an earlier one logged after the checkpoint
        self.run_logger = open_run_logger(self.cfg, self.rank, self.start_step)
        self.engine.train()
        self._start_data()
        final_saved = self.step >= self.cfg.optim.max_steps
        while self.step < self.cfg.optim.max_steps:
            if not self.train_step():
                if self.rank == 0:
                    logger.info("data exhausted after %d loader epochs at step %d on every rank",
                                self.data_epoch, self.step)
                break
            # held-out eval (rank 0; ranks wait)
            if self.cfg.observability.eval_every and self.step % self.cfg.observability.eval_every == 0:
                figures = periodic_heldout_eval(self.cfg, self.engine, self.metrics, self.device)
                self.history[-1].update(figures)
                self.run_logger.log_eval(self.step, figures)
            final = self.step >= self.cfg.optim.max_steps
            if final or self.step % self.cfg.checkpoint.checkpoint_every == 0:
                self.save_checkpoint(final=final)
                final_saved = final
        if not final_saved:
            self.save_checkpoint(final=True)
        return WorkerResult(
            rank=self.rank, world_size=self.world_size, step=self.step, start_step=self.start_step,
            samples_seen=self.samples_seen, nonfinite_steps=self.nonfinite_total, history=self.history,
            resumes=self.resumes, codebook_sha256=tensor_sha256(visual_dictionary(self.engine).codebook),
            metrics_port=self.metrics_port,
            vd_buffer_dtypes={k: str(v.dtype)
                              for k, v in visual_dictionary(self.engine).state_dict().items()},
            param_dtype=str(next(unwrap(self.engine).parameters()).dtype),
        )

    def close(self) -> None:
        self.run_logger.close()
        metrics = getattr(self, "metrics", None)
        if metrics is not None:
            metrics.stop_http_server()


def train_loop(cfg: RunConfig, store: CheckpointStore, data_url: str, *,
               under_ray: bool = False) -> WorkerResult:
    """Train to ``cfg.optim.max_steps`` (resuming from ``store``'s latest committed checkpoint) on this
    rank."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cfg.scale.use_gpu else "cpu")
    created = ensure_process_group(cfg.scale.use_gpu)
    trainer = _Trainer(cfg, store, data_url, under_ray)
    try:
        return trainer.run()
    finally:
        trainer.close()
        if created:
            destroy_process_group()
