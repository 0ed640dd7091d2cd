"""Warm start (``--init-from``): a NEW pre-training run whose model and visual dictionary come from existing
weights, e.g. to continue pre-training on another corpus.

A source is a local path or fsspec URL (``s3://`` with the run's storage options) of either

* an **export**: a ``SohoForPretraining.save_pretrained`` directory (``config.json`` + ``model.safetensors``,
  e.g. ``runs/x/final_model``), read with safetensors (no pickle); or
* one of our **committed checkpoints** (``checkpoint_step_N/``): verified first exactly as resume verifies
  one (:func:`orchestration.runtime.checkpoint.verify_local`: the rank records' sizes and sha256 digests, no
  unlisted file, every ``.pt`` test-loaded weights-only); then its ``export/`` when it has one (final
  checkpoints), otherwise DeepSpeed's ZeRO files consolidated to full fp32 weights (the optimiser's fp32
  master copies, any stage; a ZeRO-0 fp32 checkpoint's module weights are already those) inside
  :func:`~orchestration.runtime.checkpoint.weights_only_loads`, so nothing is unpickled with
  ``weights_only=False``.

Every tensor of the model is loaded, strictly: the weights and the visual dictionary's buffers (codebook, EMA
histogram, code ages, update count). The optimiser, the learning-rate schedule, the step, the data position
and the RNG start fresh: the run begins at step 0. The source's model config must equal the run's except for
:data:`MAY_DIFFER` (keys that change no tensor: initial-weight sources, dropout, the VD's decay/restart
settings, masking probabilities); anything else is refused with the differing keys named.

A relaunch of the warm-started run that finds the run's own committed checkpoint resumes it (resume wins;
the source is not read again, and a log line says so). The source, its kind and the checksums of the weights
the run started from are recorded as ``init_from`` in every ``train_state.json``, in ``summary.json`` and in
``{storage}/{run}/init_from.json``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import torch

from orchestration.runtime.checkpoint import (
    COMMITTED,
    DS_TAG,
    EXPORT_DIR,
    TRAIN_STATE,
    IncompleteCheckpointError,
    RayStore,
    Staging,
    rank_record_name,
    verify_local,
    weights_only_loads,
)
from orchestration.runtime.distributed import (
    consolidated_fp32_state_dict,
    tensor_sha256,
    unwrap,
    visual_dictionary,
)
from soho import SohoConfig
from soho.serialization import CONFIG_NAME, WEIGHTS_NAME, read_model

logger = logging.getLogger(__name__)

INIT_RECORD = "init_from.json"
CODEBOOK_KEY = "soho.visual_dictionary.codebook"

# Model-config keys whose value may differ between the source and the new run: none of them changes a tensor
# (shape, presence or meaning); they set initial weights (overwritten by the source), regularisation, the VD's
# update rule or the pre-training batch's corruption. Every other key must be equal.
MAY_DIFFER: dict[str, frozenset[str]] = {
    "encoder": frozenset({"weights"}),
    "vd": frozenset({"decay", "decay_warmup_steps", "decay_warmup_start", "init_std", "restart_dead_codes",
                     "dead_code_window", "restart_noise", "usage_window", "histogram_decay"}),
    "transformer": frozenset({"name_or_path", "hidden_dropout", "attention_dropout", "initializer_range",
                              "attn_implementation"}),
    "pretrain": frozenset({"mlm_prob", "mlm_mask_ratio", "mlm_random_ratio", "mvm_prob", "itm_neg_prob",
                           "hard_negatives", "hard_negative_temperature", "itc_weight"}),
}


class InitFromError(ValueError):
    """``--init-from`` names something that is not a usable source for this run."""


@dataclass
class InitSource:
    """What a warm start loads: full fp32 weights + buffers, the source's model config, how it was read."""

    state_dict: dict[str, torch.Tensor]
    model_config: dict[str, Any]
    kind: str  # "export", "checkpoint-export", "checkpoint-zero"
    source_step: int | None


# --- the model config --------------------------------------------------------------------------------
def config_differences(source: dict[str, Any], run: dict[str, Any]) -> list[str]:
    """``section.key: source A, this run B`` for every key that may not differ (see :data:`MAY_DIFFER`)."""
    out = []
    for section in sorted(set(source) | set(run)):
        src, mine = source.get(section, {}), run.get(section, {})
        for key in sorted(set(src) | set(mine)):
            a, b = src.get(key, "<absent>"), mine.get(key, "<absent>")
            if a == b:
                continue
            if key in MAY_DIFFER.get(section, frozenset()):
                if (section, key) != ("pretrain", "itc_weight") or (float(a) > 0) == (float(b) > 0):
                    continue  # itc_weight: the ITC projection exists exactly when it is > 0
            out.append(f"{section}.{key}: source {a!r}, this run {b!r}")
    return out


def check_model_config(source_cfg: dict[str, Any], run_cfg: SohoConfig, where: str) -> None:
    diffs = config_differences(source_cfg, run_cfg.to_dict())
    if diffs:
        raise InitFromError(
            f"--init-from {where}: its model config differs from this run's in {len(diffs)} key(s) that "
            f"change the model's tensors: {'; '.join(diffs)}. Use the source's preset and --model-overrides "
            f"(its config: {where}), or another source")


# --- reading a source ----------------------------------------------------------------------------------
def _is_local(fs: Any) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocol or "local" in protocol


def _kind_of(names: set[str]) -> str | None:
    if {CONFIG_NAME, WEIGHTS_NAME} <= names:
        return "export"
    if rank_record_name(0) in names or TRAIN_STATE in names:
        return "checkpoint"
    return None


def _not_a_source(url: str, names: set[str]) -> InitFromError:
    shown = sorted(names)[:8]
    return InitFromError(
        f"--init-from {url}: neither an export ({CONFIG_NAME} + {WEIGHTS_NAME}, e.g. runs/NAME/final_model) "
        f"nor a committed checkpoint directory (checkpoint_step_N/ with {TRAIN_STATE} and rank records); it "
        f"holds {shown}")


def _listing(fs: Any, path: str, url: str) -> set[str]:
    if not fs.isdir(path):
        raise InitFromError(f"--init-from {url}: no such directory")
    return {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}


def source_model_config(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The model config of a source, from its JSON only (nothing is unpickled; the digests are checked when
    the worker loads it): for the driver's check before any worker starts."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    names = _listing(fs, path, url)
    kind = _kind_of(names)
    if kind is None:
        raise _not_a_source(url, names)
    if kind == "checkpoint" and EXPORT_DIR in names and fs.exists(f"{path}/{EXPORT_DIR}/{CONFIG_NAME}"):
        path, kind = f"{path}/{EXPORT_DIR}", "export"
    name = CONFIG_NAME if kind == "export" else TRAIN_STATE
    try:
        doc = json.loads(fs.cat_file(f"{path}/{name}"))
        return dict(doc["config"] if kind == "export" else doc["model_config"])
    except (FileNotFoundError, KeyError, TypeError, json.JSONDecodeError) as exc:
        raise InitFromError(f"--init-from {url}: cannot read the model config from {name}: {exc!r}") from exc


def _export_state(directory: Path, url: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    config, meta, state = read_model(directory)  # safetensors: no pickle
    if meta.get("soho_class") != "SohoForPretraining":
        raise InitFromError(
            f"--init-from {url}: holds a {meta.get('soho_class')!r}, not a pre-training export "
            "(SohoForPretraining.save_pretrained, with the MLM/MVM/ITM heads a pre-training run continues)")
    return state, config.to_dict()


def _consolidate_zero(ckpt: Path, url: str) -> dict[str, torch.Tensor]:
    """Full fp32 weights + buffers of a checkpoint's DeepSpeed files (``ds/``), loaded weights-only."""
    ds_dir = ckpt / DS_TAG
    optim_files = sorted(ds_dir.glob("*_optim_states.pt"))
    with weights_only_loads():
        if not optim_files:  # ZeRO-0: the optimizer state sits in the model file, the module is the master
            files = sorted(ds_dir.glob("mp_rank_00_model_states.pt"))
            if not files:
                raise InitFromError(f"--init-from {url}: no DeepSpeed model file under {ds_dir}")
            module = torch.load(files[0], map_location="cpu", weights_only=True)["module"]
            low = sorted(k for k, v in module.items() if v.is_floating_point() and v.dtype != torch.float32)
            if low:
                raise InitFromError(
                    f"--init-from {url}: a ZeRO-0 checkpoint of a {module[low[0]].dtype} run holds no fp32 "
                    f"master weights ({low[:3]} ...); start from a checkpoint with export/ or an export")
            return dict(module)
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        chatter = io.StringIO()  # zero_to_fp32 prints its progress; keep stdout for the run summary
        try:
            with contextlib.redirect_stdout(chatter):
                state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=DS_TAG)
        except (ValueError, KeyError, FileNotFoundError) as exc:
            raise InitFromError(
                f"--init-from {url}: cannot consolidate its DeepSpeed files to fp32 weights: {exc}") from exc
        logger.debug("zero_to_fp32: %s", chatter.getvalue().strip())
        return dict(state)


def _checkpoint_source(ckpt: Path, url: str) -> InitSource:
    try:
        state = verify_local(ckpt)  # records, sizes, sha256, nothing unlisted, weights-only test loads
    except IncompleteCheckpointError as exc:
        raise InitFromError(f"--init-from {url}: not a complete, intact checkpoint: {exc}") from exc
    step = int(state["step"]) if "step" in state else None
    export = ckpt / EXPORT_DIR
    if (export / CONFIG_NAME).is_file():
        weights, model_cfg = _export_state(export, url)
        return InitSource(weights, model_cfg, "checkpoint-export", step)
    if "model_config" not in state:
        raise InitFromError(f"--init-from {url}: {TRAIN_STATE} has no model_config")
    return InitSource(_consolidate_zero(ckpt, url), dict(state["model_config"]), "checkpoint-zero", step)


def load_source(url: str, storage_options: dict[str, Any] | None, staging: Staging | None) -> InitSource:
    """Read (after downloading a remote source into a staging folder, removed afterwards) and verify a
    source; see the module docstring."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    names = _listing(fs, path, url)
    kind = _kind_of(names)
    if kind is None:
        raise _not_a_source(url, names)
    # Without Ray a checkpoint's commit is its COMMITTED marker (checkpoints/checkpoint_step_N/); Ray's
    # checkpoint folders ({run}/checkpoint_step_N/) are registered by Ray and carry none.
    if kind == "checkpoint" and path.rstrip("/").rsplit("/", 2)[-2:-1] == ["checkpoints"] and (
            COMMITTED not in names):
        raise InitFromError(f"--init-from {url}: this checkpoint was never committed (no {COMMITTED} marker)")
    local, owned = Path(path), False
    if not _is_local(fs):
        local = staging.new("init-from") if staging is not None else Path(
            tempfile.mkdtemp(prefix="soho-init-from-"))
        owned = True
        fs.get(path.rstrip("/") + "/", str(local) + "/", recursive=True)
    try:
        if kind == "export":
            weights, model_cfg = _export_state(local, url)
            return InitSource(weights, model_cfg, "export", None)
        return _checkpoint_source(local, url)
    finally:
        if owned:
            shutil.rmtree(local, ignore_errors=True)


def fit_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor],
                   url: str) -> dict[str, torch.Tensor]:
    """``state`` with exactly the model's keys, each in the model's dtype (fp32 weights; integer buffers
    such as the VD's code ages as they are); missing or extra keys are refused by name."""
    expected = model.state_dict()
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise InitFromError(f"--init-from {url}: its weights do not fit this model: missing {missing[:5]}, "
                            f"unexpected {extra[:5]}")
    out = {}
    for k, want in expected.items():
        t = state[k]
        if tuple(t.shape) != tuple(want.shape):
            raise InitFromError(f"--init-from {url}: {k} has shape {tuple(t.shape)}, this model "
                                f"{tuple(want.shape)}")
        out[k] = t.detach().to("cpu", want.dtype).contiguous()
    return out


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """One digest of a state dict: every tensor's name, dtype, shape and bytes, in name order (floating
    tensors as fp32)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu()
        t = t.float() if t.is_floating_point() else t
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


# --- the run's side ------------------------------------------------------------------------------------
def has_committed_checkpoint(store: Any) -> bool:
    """Whether the run already has a committed checkpoint of its own (then resume wins over --init-from)."""
    if isinstance(store, RayStore):
        import ray.train

        return ray.train.get_checkpoint() is not None
    return bool(store.committed_steps())


def _record_url(storage_path: str, run_name: str) -> str:
    return f"{storage_path.rstrip('/')}/{run_name}/{INIT_RECORD}"


def write_record(storage_path: str, run_name: str, storage_options: dict[str, Any], record: dict[str, Any]
                 ) -> None:
    fs, path = fsspec.core.url_to_fs(_record_url(storage_path, run_name), **storage_options)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, (json.dumps(record, indent=1, sort_keys=True) + "\n").encode())


def read_record(storage_path: str, run_name: str, storage_options: dict[str, Any]) -> dict[str, Any] | None:
    fs, path = fsspec.core.url_to_fs(_record_url(storage_path, run_name), **storage_options)
    try:
        return json.loads(fs.cat_file(path))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def warm_start(model: torch.nn.Module, run: Any, store: Any, staging: Staging | None,
               rank: int) -> tuple[dict[str, Any] | None, bool]:
    """Load ``run.init_from`` into ``model`` (before the DeepSpeed engine is built) unless the run has a
    committed checkpoint of its own. Returns (the ``init_from`` record, whether the source was skipped
    because the run resumes)."""
    url = run.init_from
    opts = run.storage_options()
    if has_committed_checkpoint(store):
        if rank == 0:
            logger.info("--init-from %s ignored: run %s has its own committed checkpoint in %s, which it "
                        "resumes (a warm start only begins a new run)", url, run.name, store.describe())
        return read_record(run.checkpoint.storage_path, run.name, opts) or {"source": url}, True
    source = load_source(url, opts, staging)
    check_model_config(source.model_config, run.model_config(), url)
    state = fit_state_dict(model, source.state_dict, url)
    model.load_state_dict(state, strict=True)
    record = {"source": url, "kind": source.kind, "source_step": source.source_step,
              "source_sha256": state_sha256(state),
              "source_codebook_sha256": tensor_sha256(state[CODEBOOK_KEY])}
    if rank == 0:
        logger.info("warm start from %s (%s%s): model and visual dictionary loaded; fresh optimiser, step 0",
                    url, source.kind,
                    f", source step {source.source_step}" if source.source_step is not None else "")
    return record, False


def engine_checksums(engine: Any) -> dict[str, str]:
    """Digests of what the engine holds at step 0: its full fp32 weights (the masters DeepSpeed trains;
    a collective under ZeRO) and the codebook."""
    full = consolidated_fp32_state_dict(engine)
    saved = unwrap(engine).state_dict(keep_vars=True).keys()  # not the non-persistent buffers
    return {"weights_sha256": state_sha256({k: full[k] for k in saved}),
            "codebook_sha256": tensor_sha256(visual_dictionary(engine).codebook)}
