"""Does pre-training on real data learn? ITM accuracy and zero-shot retrieval on a Karpathy-format split.

``--eval-data dataset_coco.json --eval-images /data/coco [--eval-split test]`` replaces the synthetic
held-out split of :mod:`orchestration.pretrain.heldout_eval` for ``--eval-every`` and ``--final-eval``. The
split is read with the fine-tuning retrieval task's reader (:func:`data_pipeline.downstream.read_karpathy`;
images resolve under ``--eval-images``, local or fsspec) and evaluated by the shared evaluator
:func:`orchestration.runtime.evaluation.pretraining_eval`: the first 5 captions per image (the 5k/1k
protocol), ITM accuracy (own first caption vs another image's) and recall@1/5/10 both ways, by default with
the fast path (ITC prefilter, ITM re-rank of each query's top ``--eval-k``), exhaustively with
``--eval-exhaustive``.

**Bounded**: ``--eval-max-images N`` evaluates a fixed subset of N images of the split, drawn with seed
:data:`SUBSET_SEED` (the same images at every evaluation and in every run, so runs compare), logged with the
first image ids. Cost per evaluation: N images + 5N captions encoded once (plus an image-only and a text-only
pass each for the prefilter), then about 2·k·6N ITM passes (fast path) or 5N² (exhaustive). The images are
decoded once and kept (``TaskCollator``'s cache), so later evaluations only run the model.

``python -m orchestration.pretrain.data_eval --model runs/x/final_model --eval-data JSON --eval-images DIR``
(or ``--checkpoint checkpoint_step_N``, verified and read as ``--init-from`` reads it) prints the same figures
offline.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from configcli import load_yaml
from data_pipeline.downstream import RetrievalImage, TaskCollator, TaskDataConfig, read_karpathy
from orchestration.pretrain.config import RunConfig
from orchestration.pretrain.init_from import fit_state_dict, load_source
from orchestration.runtime.evaluation import pretraining_eval, print_result
from soho import SohoConfig, SohoForPretraining
from soho.downstream.retrieval import RetrievalResult

logger = logging.getLogger(__name__)

SUBSET_SEED = 0
"""Seed of the ``--eval-max-images`` subset and of the ITM negatives: fixed, so every run uses the same."""
CAPTIONS_PER_IMAGE = 5
"""Captions per image kept (COCO has 5-7; the standard 5k/1k protocol keeps the first 5)."""
BATCH_SIZE = 128
"""Images per encoding batch and image-caption pairs per ITM batch."""


@dataclass
class EvalPool:
    """The images (with their captions) one evaluation ranks, and where they came from."""

    images: list[RetrievalImage]
    source: str
    split: str
    split_images: int
    """Images of the split before ``--eval-max-images``."""

    def describe(self) -> dict[str, Any]:
        return {"eval_data": self.source, "split": self.split, "images": len(self.images),
                "split_images": self.split_images,
                "subset_seed": SUBSET_SEED if len(self.images) < self.split_images else None}


def subset_indices(total: int, max_images: int | None, seed: int = SUBSET_SEED) -> list[int]:
    """Indices of a fixed subset of ``max_images`` of ``total`` images (all when None or >= total), in the
    split's order."""
    if max_images is None or max_images >= total:
        return list(range(total))
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(total, generator=g)[:max_images].tolist())


def load_pool(run: RunConfig) -> EvalPool:
    """``run``'s ``--eval-data`` split, cut to ``--eval-max-images`` (logged)."""
    obs = run.observability
    if obs.eval_data is None or obs.eval_images is None:
        raise ValueError("load_pool needs --eval-data and --eval-images")
    images = read_karpathy(obs.eval_data, obs.eval_images, obs.eval_split, run.storage_options())
    chosen = [images[i] for i in subset_indices(len(images), obs.eval_max_images)]
    if len(chosen) < 2:
        raise ValueError(f"--eval-data {obs.eval_data}: split {obs.eval_split!r} has {len(chosen)} image(s); "
                         "an evaluation needs at least 2 (an ITM negative is another image's caption)")
    captions = sum(min(len(im.captions), CAPTIONS_PER_IMAGE) for im in chosen)
    if len(chosen) < len(images):
        logger.info("eval pool: %d of the %d %r images of %s (fixed subset, seed %d; first ids %s), "
                    "%d captions",
                    len(chosen), len(images), obs.eval_split, obs.eval_data, SUBSET_SEED,
                    [im.image_id for im in chosen[:5]], captions)
    else:
        logger.info("eval pool: all %d %r images of %s, %d captions", len(chosen), obs.eval_split,
                    obs.eval_data, captions)
    return EvalPool(chosen, obs.eval_data, obs.eval_split, len(images))


def make_collator(run: RunConfig, model_config: SohoConfig) -> TaskCollator:
    """Images and captions presented as the run's loader presents them (size, padding, caption length)."""
    return TaskCollator(TaskDataConfig(max_image_side=run.dataset.image_size,
                                       pad_multiple=model_config.encoder.total_stride,
                                       max_text_len=run.dataset.max_text_len,
                                       storage_options=run.storage_options()))


def evaluate_pool(model: Any, run: RunConfig, pool: EvalPool, collator: TaskCollator | None = None,
                  device: torch.device | str = "cpu") -> dict[str, Any]:
    """:func:`~orchestration.runtime.evaluation.pretraining_eval` with the run's evaluation options."""
    obs = run.observability
    return pretraining_eval(model, collator or make_collator(run, model.config), pool.images, k=obs.eval_k,
                            exhaustive=obs.eval_exhaustive, max_captions=CAPTIONS_PER_IMAGE,
                            batch_size=BATCH_SIZE, device=device, seed=SUBSET_SEED)


def history_fields(out: dict[str, Any]) -> dict[str, float]:
    """A step-history record's ``eval_*`` fields (recall 0..1, the values exported to Prometheus)."""
    result: RetrievalResult = out["result"]
    record: dict[str, float] = {f"eval_{d}_r{k}": v / 100.0 for d, rec in result.recalls.items()
                                for k, v in rec.items()}
    record.update({"eval_itm_acc": out["itm_acc"], "eval_candidates": out["num_images"],
                   "eval_texts": out["num_texts"], "eval_pairs_scored": out["pairs_scored"]})
    return record


_POOLS: dict[tuple[Any, ...], tuple[EvalPool, TaskCollator]] = {}


def periodic_eval(run: RunConfig, model: Any, device: torch.device | str = "cpu"
                  ) -> tuple[dict[str, float], RetrievalResult, str]:
    """One ``--eval-every`` evaluation of ``model`` (rank 0): the history fields, the retrieval result and
    a description for the log. The pool and its decoded images are kept for the next evaluation."""
    obs = run.observability
    key = (obs.eval_data, obs.eval_images, obs.eval_split, obs.eval_max_images, run.dataset.image_size,
           run.dataset.max_text_len)
    if key not in _POOLS:
        _POOLS[key] = (load_pool(run), make_collator(run, model.config))
    pool, collator = _POOLS[key]
    out = evaluate_pool(model, run, pool, collator, device)
    how = "exhaustive ITM" if obs.eval_exhaustive else f"ITC prefilter + ITM re-rank of the top {obs.eval_k}"
    what = f"{pool.source} {pool.split} ({out['num_images']} images, {out['num_texts']} captions, {how})"
    return history_fields(out), out["result"], what


def summary_figures(model: Any, out: dict[str, Any], pool: EvalPool, run: RunConfig) -> dict[str, Any]:
    """What ``summary.json`` keeps under ``heldout`` (recall in percent, as the synthetic held-out eval)."""
    health = model.soho.visual_dictionary.health()
    obs = run.observability
    return {
        "source": pool.describe(),
        "mode": out["mode"],
        "itm_acc": out["itm_acc"],
        "itm_acc_pos": out["itm_acc_pos"],
        "itm_acc_neg": out["itm_acc_neg"],
        **{k: round(v, 2) for k, v in out["result"].flat().items()},
        "num_candidates": out["num_images"],
        "num_texts": out["num_texts"],
        "chance_r1": round(100.0 / out["num_images"], 2),
        "prefilter_k": None if obs.eval_exhaustive else obs.eval_k,
        "pairs_scored": out["pairs_scored"],
        "vd_usage_ratio": health["usage_ratio"],
        "vd_perplexity": round(float(health["perplexity"]), 2),
        "vd_dead_codes": health["dead_codes"],
        "vd_num_codes": model.config.vd.num_codes,
        "eval_seconds": round(out["seconds"], 1),
    }


def evaluate_model(model: Any, run: RunConfig, device: torch.device | str = "cpu") -> dict[str, Any]:
    """All figures of a ``SohoForPretraining`` on ``run``'s ``--eval-data`` (offline and ``--final-eval``)."""
    pool = load_pool(run)
    return summary_figures(model, evaluate_pool(model, run, pool, device=device), pool, run)


def model_from_source(path: str, run: RunConfig) -> SohoForPretraining:
    """A model from an export or a committed checkpoint, read and verified as ``--init-from`` reads it."""
    source = load_source(path, run.storage_options(), None)
    model = SohoForPretraining(SohoConfig.from_dict(source.model_config), load_pretrained=False)
    model.load_state_dict(fit_state_dict(model, source.state_dict, path), strict=True)
    return model


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m orchestration.pretrain.data_eval",
                                description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="an export (final_model) directory of a pre-training run")
    src.add_argument("--checkpoint", help="a committed checkpoint_step_* directory")
    p.add_argument("--config", type=Path, help="the run's YAML (image_size, max_text_len, eval_* options)")
    p.add_argument("--eval-data", required=True, help="Karpathy-format split JSON")
    p.add_argument("--eval-images", required=True, help="image root of its entries")
    p.add_argument("--eval-split", default=None)
    p.add_argument("--eval-max-images", type=int, default=None)
    p.add_argument("--eval-k", type=int, default=None)
    p.add_argument("--eval-exhaustive", action="store_true")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    a = p.parse_args(argv)
    run = RunConfig.from_dict(load_yaml(a.config), source=str(a.config)) if a.config else RunConfig()
    changes: dict[str, Any] = {"eval_data": a.eval_data, "eval_images": a.eval_images,
                               "eval_max_images": a.eval_max_images, "eval_exhaustive": a.eval_exhaustive}
    changes.update({k: v for k, v in (("eval_split", a.eval_split), ("eval_k", a.eval_k)) if v is not None})
    run = run.replace(**changes)
    path = a.model or a.checkpoint
    result = {"model": path, **evaluate_model(model_from_source(path, run), run)}
    print_result(result, a.out)
    return result


if __name__ == "__main__":  # pragma: no cover
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main()
