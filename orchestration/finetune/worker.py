"""Fine-tuning and evaluation on the downstream tasks: ``python -m soho.finetune`` / ``python -m soho.evaluate``.

The worker (`finetune_worker`) is Ray-free like the pre-training loop: it runs on an existing
``torch.distributed`` process group (Ray Train's, torchrun's) or makes a one-process gloo group, reuses the
pre-training building blocks (`ensure_process_group`, the VD's `sum_over_ranks` reduce, `step_generator`,
AdamW groups and lr schedule from `orchestration.runtime.schedule`, `build_deepspeed_config`) and steps through a
DeepSpeed engine (``--engine deepspeed``, default) or plain torch (``--engine torch``, DDP when world > 1;
for machines without DeepSpeed). ``--launcher ray`` wraps the same worker in Ray Train's TorchTrainer.
Rank 0 evaluates, saves the task model (``{output}/model``) and writes ``{output}/results.json``.

Data: ``--data`` is a downstream root in the synthetic layout (``{data}/vqa/train_questions.json``, …,
``{data}/images``); without it the synthetic files are generated once into the local cache. Real datasets:
``--train-file/--eval-file`` (+ ``--train-annotations/--eval-annotations`` for VQA) and ``--image-dir``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from data_pipeline.downstream import (
    TaskCollator,
    TaskDataConfig,
    collate_nlvr2,
    collate_retrieval_pairs,
    collate_snli_ve,
    collate_vqa,
    read_karpathy,
    read_nlvr2,
    read_snli_ve,
    read_vqa,
)
from orchestration.pretrain.config import RunConfig, default_cache_dir
from orchestration.runtime.evaluation import evaluate_classification, evaluate_retrieval, evaluate_vqa
from orchestration.runtime.ds_config import build_deepspeed_config
from orchestration.runtime.schedule import apply_lr, param_groups
from orchestration.pretrain.worker import (
    destroy_process_group,
    ensure_process_group,
    step_generator,
    sum_over_ranks,
    unwrap,
)
from soho import get_preset
from soho.downstream.modeling import TASK_MODELS, load_task_model
from soho.downstream.vqa import AnswerVocab

logger = logging.getLogger(__name__)

TASKS = ("vqa", "nlvr2", "snli_ve", "retrieval")
RESULTS_NAME = "results.json"
ANSWERS_NAME = "answers.json"


@dataclass
class FinetuneConfig:
    """Every field is a CLI flag (``--max-steps``) and may come from ``--config file.yaml``."""

    task: str = field(default="vqa", metadata={"help": "vqa | nlvr2 | snli_ve | retrieval"})
    init: str | None = field(default=None, metadata={"help": "pre-training export dir (None: from scratch)"})
    checkpoint: str | None = field(default=None, metadata={"help": "fine-tuned model dir (evaluate only)"})
    preset: str = field(default="tiny", metadata={"help": "model preset when training from scratch"})
    data: str | None = field(default=None, metadata={"help": "downstream root in the synthetic layout"})
    train_file: str | None = field(
        default=None, metadata={"help": "override: train questions/JSONL/Karpathy"}
    )
    eval_file: str | None = field(default=None, metadata={"help": "override: eval questions/JSONL/Karpathy"})
    train_annotations: str | None = field(default=None, metadata={"help": "VQA train annotations JSON"})
    eval_annotations: str | None = field(default=None, metadata={"help": "VQA eval annotations JSON"})
    image_dir: str | None = field(default=None, metadata={"help": "override: image directory"})
    train_split: str = field(default="train", metadata={"help": "retrieval: Karpathy split(s) to train on"})
    eval_split: str = field(default="test", metadata={"help": "retrieval: Karpathy split to evaluate"})
    output: str = field(default="runs/finetune", metadata={"help": "where model/ and results.json go"})
    max_steps: int = field(default=100, metadata={"help": "optimizer steps"})
    micro_batch_size: int = field(default=16, metadata={"help": "examples per worker per step"})
    lr: float = field(default=1e-4, metadata={"help": "peak lr (heads and transformer)"})
    backbone_lr: float | None = field(default=None, metadata={"help": "ResNet trunk lr (default: --lr)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    warmup_steps: int = field(default=10, metadata={"help": "linear warm-up steps"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient norm clip"})
    precision: str = field(default="fp32", metadata={"help": "fp32 | bf16"})
    engine: str = field(default="deepspeed", metadata={"help": "deepspeed | torch"})
    zero_stage: int = field(default=0, metadata={"help": "DeepSpeed ZeRO stage"})
    launcher: str = field(default="local", metadata={"help": "local (this process / torchrun rank) | ray"})
    num_workers: int = field(default=1, metadata={"help": "Ray workers (--launcher ray)"})
    use_gpu: bool = field(default=False, metadata={"help": "one GPU per worker"})
    seed: int = field(default=0, metadata={"help": "seed of head init, data order and negatives"})
    image_size: int = field(default=128, metadata={"help": "longest image side (as in pre-training)"})
    max_text_len: int = field(default=40, metadata={"help": "tokens per text incl. [CLS]/[SEP]"})
    eval_batch_size: int = field(default=64, metadata={"help": "examples (or pairs) per eval batch"})
    eval_limit: int | None = field(default=None, metadata={"help": "evaluate on the first N examples/images"})
    retrieval_k: int = field(default=16, metadata={"help": "prefilter candidates reranked by ITM"})
    retrieval_exhaustive: bool = field(default=True, metadata={"help": "also rank every pair with ITM"})
    vqa_min_answer_count: int = field(default=1, metadata={"help": "answer vocabulary: min human count"})
    vqa_max_answers: int = field(default=3129, metadata={"help": "answer vocabulary size cap"})
    skip_eval: bool = field(default=False, metadata={"help": "train only"})
    progress: bool = field(default=True, metadata={"help": "progress bars (rank 0)"})
    log_every: int = field(default=10, metadata={"help": "log every N steps"})
    tensorboard_dir: str | None = field(
        default=None, metadata={"help": "TensorBoard events of rank 0 (finetune/* per step, finetune_eval/* at the "
                                        "end) in DIR/<output name>-<task>/: local path or fsspec URL"})

    def validate(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"--task {self.task!r}: expected one of {TASKS}")
        if self.engine not in ("deepspeed", "torch"):
            raise ValueError(f"--engine {self.engine!r}: expected deepspeed or torch")
        if self.launcher not in ("local", "ray"):
            raise ValueError(f"--launcher {self.launcher!r}: expected local or ray")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"--precision {self.precision!r}: expected fp32 or bf16")
        if self.micro_batch_size < 2 and self.task == "retrieval":
            raise ValueError("retrieval fine-tuning needs --micro-batch-size ≥ 2 (in-batch negatives)")
        if self.max_steps < 0:
            raise ValueError(f"--max-steps must be ≥ 0, got {self.max_steps}")

    def run_config(self) -> RunConfig:
        """The pre-training RunConfig fields our shared optimiser/DeepSpeed helpers read."""
        return RunConfig(
            preset=self.preset, max_steps=max(1, self.max_steps), micro_batch_size=self.micro_batch_size,
            grad_accum=1, lr=self.lr, backbone_lr=self.backbone_lr, weight_decay=self.weight_decay,
            warmup_steps=self.warmup_steps, grad_clip=self.grad_clip, precision=self.precision,
            zero_stage=self.zero_stage, use_gpu=self.use_gpu, seed=self.seed, num_workers=max(1, self.num_workers),
            freeze_backbone_steps=0, freeze_backbone_epochs=0,
        )  # fmt: skip


# --- data ---------------------------------------------------------------------------------------------
def synthetic_downstream_root(seed: int = 0) -> str:
    """The embedded synthetic downstream files, written once into the local cache."""
    from data_pipeline.synth import make_synthetic

    out = default_cache_dir() / f"finetune-synthetic-s{seed}"
    result = make_synthetic(str(out), num=16, seed=seed, heldout=0, image_size=128)
    return str(result["downstream"])


def read_task_examples(cfg: FinetuneConfig, split: str) -> list[Any]:
    """Examples of `split` ("train" | "eval") for cfg.task, from --data's layout or the override flags."""
    root = cfg.data
    images = cfg.image_dir or (f"{root}/images" if root else None)
    explicit = cfg.train_file if split == "train" else cfg.eval_file
    if explicit is None and root is None:
        raise ValueError(f"no data for {cfg.task} {split}: give --data or --{split}-file")
    if cfg.task == "vqa":
        name = "train" if split == "train" else "val"
        qfile = explicit or f"{root}/vqa/{name}_questions.json"
        afile = (cfg.train_annotations if split == "train" else cfg.eval_annotations) or (
            f"{root}/vqa/{name}_annotations.json" if root else None
        )
        return read_vqa(qfile, _need(images, "--image-dir"), afile)
    if cfg.task == "nlvr2":
        return read_nlvr2(explicit or f"{root}/nlvr2/{'train' if split == 'train' else 'dev'}.jsonl",
                          _need(images, "--image-dir"))  # fmt: skip
    if cfg.task == "snli_ve":
        return read_snli_ve(explicit or f"{root}/snli_ve/{'train' if split == 'train' else 'dev'}.jsonl",
                            _need(images, "--image-dir"))  # fmt: skip
    karpathy = explicit or _first_json(f"{root}/retrieval")
    splits = tuple(cfg.train_split.split(",")) if split == "train" else cfg.eval_split
    # Karpathy entries carry their folder ("filepath"), so images resolve under the dataset root.
    return read_karpathy(karpathy, cfg.image_dir or _need(root, "--image-dir"), splits)


def _need(value: str | None, flag: str) -> str:
    if value is None:
        raise ValueError(f"{flag} is required when --data is not given")
    return value


def _first_json(directory: str) -> str:
    found = sorted(Path(directory).glob("dataset_*.json"))
    if not found:
        raise FileNotFoundError(f"no Karpathy split file dataset_*.json in {directory}")
    return str(found[0])


class _Batches:
    """Endless, per-rank batches: each epoch shuffles the examples by (seed, epoch), then rank r takes every
    world-th one, so ranks see disjoint data of equal count."""

    def __init__(
        self, cfg: FinetuneConfig, examples: list[Any], collator: TaskCollator, rank: int, world: int
    ):
        if len(examples) < cfg.micro_batch_size * world:
            raise ValueError(
                f"{cfg.task}: {len(examples)} training examples < micro batch {cfg.micro_batch_size} × {world} workers"
            )
        self.cfg, self.examples, self.collator, self.rank, self.world = cfg, examples, collator, rank, world
        self.epoch = 0

    def __iter__(self) -> Any:
        cfg = self.cfg
        while True:
            order = list(range(len(self.examples)))
            random.Random(f"{cfg.seed}/finetune/{self.epoch}").shuffle(order)
            mine = order[self.rank :: self.world]
            for start in range(0, len(mine) - cfg.micro_batch_size + 1, cfg.micro_batch_size):
                chunk = [self.examples[i] for i in mine[start : start + cfg.micro_batch_size]]
                yield self._collate(chunk)
            self.epoch += 1

    def _collate(self, chunk: list[Any]) -> dict[str, Any]:
        task = self.cfg.task
        if task == "vqa":
            return collate_vqa(self.collator, chunk)
        if task == "nlvr2":
            return collate_nlvr2(self.collator, chunk)
        if task == "snli_ve":
            return collate_snli_ve(self.collator, chunk)
        # one caption per image, drawn by (seed, epoch, image) so every caption is used over epochs
        choice = [
            random.Random(f"{self.cfg.seed}/{self.epoch}/{im.image_id}").randrange(1 << 30) for im in chunk
        ]
        return collate_retrieval_pairs(self.collator, chunk, choice)


# --- model --------------------------------------------------------------------------------------------
def build_task_model(cfg: FinetuneConfig, vocab: AnswerVocab | None) -> torch.nn.Module:
    cls = TASK_MODELS[cfg.task]
    args: dict[str, Any] = {"num_answers": len(vocab)} if cfg.task == "vqa" and vocab is not None else {}
    torch.manual_seed(cfg.seed)  # identical head init on every rank
    if cfg.init:
        model = cls.from_backbone(cfg.init, **args)
        logger.info("%s: backbone from %s", cfg.task, cfg.init)
    else:
        model = cls(get_preset(cfg.preset), **args)
        logger.info("%s: from scratch (preset %s)", cfg.task, cfg.preset)
    return model


def _forward(model: Any, task: str, batch: dict[str, Any], device: torch.device, dtype: torch.dtype,
             vocab: AnswerVocab | None, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:  # fmt: skip
    pv = batch["pixel_values"].to(device, dtype)
    args = (
        pv,
        batch["pixel_mask"].to(device),
        batch["input_ids"].to(device),
        batch["attention_mask"].to(device),
    )
    if task == "vqa":
        assert vocab is not None
        target = torch.stack([vocab.target_scores(a) for a in batch["answers"]]).to(device)
        out = model(*args, target_scores=target)
        return out.loss, {"loss": out.loss.item()}
    if task in ("nlvr2", "snli_ve"):
        out = model(*args, labels=batch["labels"].to(device))
        acc = (out.logits.argmax(-1) == batch["labels"].to(device)).float().mean().item()
        return out.loss, {"loss": out.loss.item(), "acc": acc}
    out = model(*args, generator=generator)
    return out.loss, {"loss": out.loss.item(), "itm": out.itm_loss.item(), "itc": out.itc_loss.item(),
                      "itm_acc": out.itm_acc.item()}  # fmt: skip


def evaluate_model(cfg: FinetuneConfig, model: Any, collator: TaskCollator, examples: list[Any],
                   vocab: AnswerVocab | None, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:  # fmt: skip
    if cfg.eval_limit is not None:
        examples = examples[: cfg.eval_limit]
    kw = {"batch_size": cfg.eval_batch_size, "device": device, "dtype": dtype}
    if cfg.task == "vqa":
        assert vocab is not None
        return evaluate_vqa(model, collator, examples, vocab, progress=cfg.progress, **kw)
    if cfg.task in ("nlvr2", "snli_ve"):
        return evaluate_classification(model, collator, examples, progress=cfg.progress, **kw)
    return evaluate_retrieval(
        model, collator, examples, k=cfg.retrieval_k, exhaustive=cfg.retrieval_exhaustive, **kw
    )


# --- the worker ---------------------------------------------------------------------------------------
def finetune_worker(cfg: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune on this rank (process group from the caller, the environment, or a 1-process gloo one)."""
    cfg.validate()
    created = ensure_process_group(cfg.use_gpu)
    try:
        return _finetune(cfg)
    finally:
        if created:
            destroy_process_group()


def _finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = torch.device(f"cuda:{local_rank}" if cfg.use_gpu else "cpu")
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    t_start = time.perf_counter()

    train = read_task_examples(cfg, "train")
    vocab = None
    if cfg.task == "vqa":
        vocab = AnswerVocab.build((e.answers for e in train), cfg.vqa_min_answer_count, cfg.vqa_max_answers)
    model = build_task_model(cfg, vocab)
    soho_cfg = unwrap(model).config
    collator = TaskCollator(TaskDataConfig(max_image_side=cfg.image_size, pad_multiple=soho_cfg.encoder.total_stride,
                                           max_text_len=cfg.max_text_len))  # fmt: skip
    if world > 1:
        model.soho.visual_dictionary.reduce_fn = sum_over_ranks
    run_cfg = cfg.run_config()
    groups, specs = param_groups(model, run_cfg)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.engine == "deepspeed":
        import deepspeed

        if not cfg.use_gpu:
            # As in pre-training (orchestration.pretrain.worker): skip the CPU backend's JIT-compiled shared-memory
            # all-reduce (minutes of C++ under a file lock every starting worker waits on); gloo is enough.
            import deepspeed.ops

            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, dist_init_required=False,
                                               config=build_deepspeed_config(run_cfg, world))  # fmt: skip
    else:
        model = model.to(device)
        engine = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model

    history: list[dict[str, float]] = []
    from orchestration.runtime.loggers import RunLogger

    tb = RunLogger(run_name=f"{Path(cfg.output).name}-{cfg.task}", rank=rank, tensorboard_dir=cfg.tensorboard_dir)
    batches = iter(_Batches(cfg, train, collator, rank, world))
    bar = None
    if rank == 0 and cfg.progress and cfg.max_steps:
        from tqdm import tqdm

        bar = tqdm(total=cfg.max_steps, desc=f"finetune {cfg.task}", leave=False)
    unwrap(engine).train()
    for step in range(cfg.max_steps):
        lr = apply_lr(engine.optimizer if cfg.engine == "deepspeed" else optimizer, specs, run_cfg, step, False)
        batch = next(batches)
        with torch.autocast(
            device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16" and cfg.engine == "torch"
        ):
            loss, stats = _forward(
                engine, cfg.task, batch, device, dtype, vocab, step_generator(cfg.seed, step, rank)
            )
        if cfg.engine == "deepspeed":
            engine.backward(loss)
            engine.step()
        else:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
        history.append({"step": step + 1, **stats})
        tb.log_scalars(step + 1, {**{f"finetune/{k}": float(v) for k, v in stats.items()}, "finetune/lr": lr})
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{stats['loss']:.3f}")
        if rank == 0 and (step + 1) % max(1, cfg.log_every) == 0:
            logger.info("%s step %d/%d: %s", cfg.task, step + 1, cfg.max_steps,
                        " ".join(f"{k}={v:.4f}" for k, v in stats.items()))  # fmt: skip
    if bar is not None:
        bar.close()
    t_train = time.perf_counter() - t_start

    results: dict[str, Any] = {"task": cfg.task, "init": cfg.init, "world_size": world, "steps": cfg.max_steps,
                               "train_examples": len(train), "train_seconds": t_train, "history": history,
                               "config": dataclasses.asdict(cfg)}  # fmt: skip
    if rank == 0:
        out = Path(cfg.output)
        bare = unwrap(engine)
        bare.save_pretrained(out / "model")
        if vocab is not None:
            vocab.save(out / "model" / ANSWERS_NAME)
        if not cfg.skip_eval:
            t0 = time.perf_counter()
            results["eval"] = evaluate_model(
                cfg, bare, collator, read_task_examples(cfg, "eval"), vocab, device, dtype
            )
            results["eval_seconds"] = time.perf_counter() - t0
            logger.info("%s eval: %s", cfg.task, {k: v for k, v in results["eval"].items()})
            tb.log_scalars(cfg.max_steps, {f"finetune_eval/{k}": float(v) for k, v in results["eval"].items()
                                           if isinstance(v, (int, float)) and k != "num_examples"})
        tb.close()
        results["model_dir"] = str(out / "model")
        (out / RESULTS_NAME).write_text(json.dumps(results, indent=1, default=str) + "\n")
    if world > 1:
        dist.barrier()
    return results


def evaluate_checkpoint(cfg: FinetuneConfig) -> dict[str, Any]:
    """Evaluate a fine-tuned model directory (``--checkpoint``) on the task's eval split (one process)."""
    if not cfg.checkpoint:
        raise ValueError("--checkpoint (a fine-tuned model directory) is required")
    cfg.validate()
    device = torch.device("cuda" if cfg.use_gpu else "cpu")
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    model = load_task_model(cfg.checkpoint)
    if model.task != cfg.task:
        raise ValueError(f"--checkpoint {cfg.checkpoint} is a {model.task!r} model, not --task {cfg.task!r}")
    vocab = AnswerVocab.load(Path(cfg.checkpoint) / ANSWERS_NAME) if cfg.task == "vqa" else None
    model = model.to(device)
    collator = TaskCollator(TaskDataConfig(max_image_side=cfg.image_size, pad_multiple=model.config.encoder.total_stride,
                                           max_text_len=cfg.max_text_len))  # fmt: skip
    t0 = time.perf_counter()
    results = {"task": cfg.task, "checkpoint": cfg.checkpoint,
               "eval": evaluate_model(cfg, model, collator, read_task_examples(cfg, "eval"), vocab, device, dtype),
               "eval_seconds": time.perf_counter() - t0}  # fmt: skip
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS_NAME).write_text(json.dumps(results, indent=1, default=str) + "\n")
    return results


# --- launch -------------------------------------------------------------------------------------------
def _ray_entry(config: dict[str, Any]) -> None:
    finetune_worker(FinetuneConfig(**config["finetune_config"]))


_PATH_FIELDS = ("init", "checkpoint", "data", "train_file", "eval_file", "train_annotations", "eval_annotations",
                "image_dir", "output", "tensorboard_dir")


def _absolute_paths(cfg: FinetuneConfig) -> FinetuneConfig:
    """Local paths resolved against the driver's directory: Ray Train workers run in their own directory."""
    changes = {name: os.path.abspath(value) for name in _PATH_FIELDS
               if (value := getattr(cfg, name)) and "://" not in value}  # fmt: skip
    return dataclasses.replace(cfg, **changes)


def launch_ray(cfg: FinetuneConfig) -> dict[str, Any]:
    """The same worker on Ray Train (gloo on CPU, NCCL on GPU); returns rank 0's results.json.

    Joins an initialised Ray, else $RAY_ADDRESS, else a `ray start` cluster on this machine, else starts a
    local one (as pre-training's launcher does)."""
    import ray
    from ray.train import RunConfig as RayRunConfig
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    started = not ray.is_initialized()
    if started:
        env_vars = {"DS_ACCELERATOR": "cuda" if cfg.use_gpu else "cpu", "PYTHONUNBUFFERED": "1"}
        for key in ("SOHO_CACHE_DIR", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            if key in os.environ:
                env_vars[key] = os.environ[key]
        kwargs: dict[str, Any] = {"runtime_env": {"env_vars": env_vars}, "log_to_driver": True}
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address=os.environ["RAY_ADDRESS"], **kwargs)
        else:
            try:
                ray.init(address="auto", **kwargs)
            except ConnectionError:
                ray.init(num_cpus=max(cfg.num_workers, os.cpu_count() or 1), include_dashboard=False, **kwargs)
    cfg = dataclasses.replace(_absolute_paths(cfg), progress=False)
    trainer = TorchTrainer(
        _ray_entry,
        train_loop_config={"finetune_config": dataclasses.asdict(cfg)},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        run_config=RayRunConfig(
            name=f"finetune-{cfg.task}", storage_path=os.path.abspath(os.path.join(cfg.output, "ray"))
        ),
    )
    try:
        trainer.fit()
        return json.loads((Path(cfg.output) / RESULTS_NAME).read_text())
    finally:
        if started:
            ray.shutdown()


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", help="YAML file of options (flags win over it)")
    for f in dataclasses.fields(FinetuneConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        if isinstance(default, bool):
            p.add_argument(
                flag,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f.metadata["help"],
            )
        else:
            kind = {int: int, float: float}.get(type(default), str)
            if f.name in ("backbone_lr",):
                kind = float
            if f.name in ("eval_limit",):
                kind = int
            p.add_argument(
                flag, dest=f.name, type=kind, default=None, help=f"{f.metadata['help']} (default {default})"
            )
    return p


def parse_config(argv: list[str] | None, prog: str) -> FinetuneConfig:
    args = vars(_parser(prog).parse_args(argv))
    values: dict[str, Any] = {}
    config_path = args.pop("config")
    if config_path:
        import yaml

        data = yaml.safe_load(Path(config_path).read_text()) or {}
        known = {f.name for f in dataclasses.fields(FinetuneConfig)}
        bad = set(data) - known if isinstance(data, dict) else {"<not a mapping>"}
        if bad:
            raise ValueError(f"--config {config_path}: unknown options {sorted(bad)}")
        values.update(data)
    values.update({k: v for k, v in args.items() if v is not None})
    cfg = FinetuneConfig(**values)
    if cfg.data is None and cfg.train_file is None and cfg.eval_file is None:
        cfg.data = synthetic_downstream_root(cfg.seed)
    cfg.validate()
    return cfg


def _configure_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``python -m soho.finetune``: fine-tune, evaluate, write {output}/results.json; returns it."""
    _configure_logging()
    cfg = parse_config(argv, "python -m soho.finetune")
    results = launch_ray(cfg) if cfg.launcher == "ray" else finetune_worker(cfg)
    if results.get("eval") is not None:
        print(json.dumps({"task": cfg.task, "eval": results["eval"]}, indent=1))
    return results


def evaluate_main(argv: list[str] | None = None) -> dict[str, Any]:
    """``python -m soho.evaluate --task T --checkpoint DIR``: evaluate a fine-tuned model."""
    _configure_logging()
    cfg = parse_config(argv, "python -m soho.evaluate")
    results = evaluate_checkpoint(cfg)
    print(json.dumps(results["eval"], indent=1))
    return results
