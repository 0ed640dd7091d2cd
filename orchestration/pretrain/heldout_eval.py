"""Does pre-training learn? Held-out ITM accuracy and zero-shot retrieval of a pre-training export.

The synthetic data pipeline writes, beside the pre-training pairs, a ``heldout/`` split of scenes whose
object layout never occurs in pre-training (``make_synthetic(..., heldout=N)``; same seed and pair count
as the run, so the excluded scenes are exactly the ones the run trained on). On the first
``num_candidates`` held-out pairs this module measures, with the run's own image/text geometry:

* **ITM accuracy**: every image with its own caption (label 1) and with the caption of another held-out
  image (label 0, a fixed derangement), 2·N predictions of the ITM head, chance 50 %.
* **Zero-shot retrieval**: all N×N image-caption pairs ranked by ITM score (image→text and text→image
  recall@1/5/10 among N candidates, chance 1/N), through the downstream engineer's
  :func:`orchestration.runtime.evaluation.pretraining_retrieval_eval` (batched cross-modal passes).
* **Language generalisation**: both figures again on the same held-out images described by
  :mod:`data_pipeline.paraphrase` (sentence frames, word orders and function words the training generator
  never produces; same concept words): keys ``para_*``. The gap to the generator's captions is what the model
  learnt about the caption templates rather than the scenes.
* **Codebook health** at the end of training, from the visual dictionary buffers saved in the export.

``python -m orchestration.pretrain.heldout_eval --model runs/x/final_model
--config configs/synthetic_cpu.yaml`` prints the figures as JSON (``--out`` writes them to a file).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from configcli import load_yaml
from data_pipeline.downstream import RetrievalImage, TaskCollator, TaskDataConfig
from data_pipeline.paraphrase import paraphrase_caption, scene_from_dict
from data_pipeline.storage import get_fs
from data_pipeline.synth import SynthConfig, make_synthetic
from data_pipeline.tarstream import iter_tar
from orchestration.pretrain.config import RunConfig
from orchestration.pretrain.data_eval import periodic_eval
from orchestration.runtime.config import synthetic_data_dir
from orchestration.runtime.distributed import consolidated_fp32_state_dict
from orchestration.runtime.evaluation import (
    derangement,
    export_recall,
    pretraining_retrieval_eval,
    print_result,
)
from soho import SohoConfig, SohoForPretraining
from soho.downstream.retrieval import RetrievalResult

logger = logging.getLogger(__name__)

# the size orchestration.pretrain.launch.ensure_data renders the embedded scenes at
SYNTHETIC_IMAGE_SIZE = 128
_SAFE_KEY = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass
class HeldoutConfig:
    """Which held-out set, and how to present it to the model (use the run's own values)."""

    synthetic_pairs: int = 2048
    """Pre-training pairs of the run: the held-out scenes exclude exactly these."""
    seed: int = 0
    num_candidates: int = 100
    """N: images (and captions) in the retrieval pool; ITM accuracy uses the same N pairs."""
    image_size: int = 96
    max_text_len: int = 40
    batch_size: int = 500
    """Cross-modal pairs per forward pass (retrieval scores N² pairs)."""
    cache_dir: str | None = None
    """Where the held-out copy of the synthetic data is made once (default: $SOHO_CACHE_DIR)."""
    synthetic_captions: int = 1
    """Captions per pre-training pair of the run (``--synthetic-captions``): the copy a run trains on
    directly must hold them; the held-out sets score the generator's (txt) caption and the paraphrase."""

    def validate(self) -> None:
        for name in ("synthetic_pairs", "num_candidates", "image_size", "max_text_len", "batch_size",
                     "synthetic_captions"):
            if getattr(self, name) < 1:
                raise ValueError(f"HeldoutConfig.{name}={getattr(self, name)}: must be >= 1")
        if self.num_candidates < 2:
            raise ValueError(
                "HeldoutConfig.num_candidates must be >= 2 (an ITM negative needs another image)")

    @classmethod
    def from_run_config(cls, run: RunConfig, **changes: Any) -> HeldoutConfig:
        return cls(synthetic_pairs=run.dataset.synthetic_pairs, seed=run.seed,
                   image_size=run.dataset.image_size, max_text_len=run.dataset.max_text_len,
                   **{"synthetic_captions": run.dataset.synthetic_captions, **changes})


def heldout_data_dir(cfg: HeldoutConfig) -> Path:
    return synthetic_data_dir(cfg.synthetic_pairs, cfg.seed, heldout=cfg.num_candidates, root=cfg.cache_dir,
                              captions=cfg.synthetic_captions)


CAPTION_SETS = ("generator", "paraphrase")


def prepare_heldout(cfg: HeldoutConfig, captions: str = "generator") -> tuple[list[RetrievalImage], str]:
    """Make (once) the synthetic data with a held-out split and unpack its first ``num_candidates`` pairs
    as image files. Returns (images with one caption each, the pre-training manifest URL of the same data,
    which a run may train on directly). ``captions``: ``"generator"`` (the caption stored with the sample,
    from the training generator's frames) or ``"paraphrase"`` (the sample's scene described by
    :func:`data_pipeline.paraphrase.paraphrase_caption`, seeded by the sample key)."""
    if captions not in CAPTION_SETS:
        raise ValueError(f"captions={captions!r}: one of {CAPTION_SETS}")
    cfg.validate()
    out = heldout_data_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    result = make_synthetic(str(out), num=cfg.synthetic_pairs, seed=cfg.seed, heldout=cfg.num_candidates,
                            image_size=SYNTHETIC_IMAGE_SIZE,
                            config=SynthConfig(captions_per_scene=cfg.synthetic_captions))
    image_dir = out / "heldout_images"
    image_dir.mkdir(exist_ok=True)
    manifest_url = result["heldout_manifest"]
    fs, manifest_path = get_fs(manifest_url)
    manifest = json.loads(fs.cat_file(manifest_path))
    base = manifest_path.rsplit("/", 1)[0]
    images: list[RetrievalImage] = []
    problems: list[str] = []
    for shard in manifest["shards"]:
        with fs.open(f"{base}/{shard['name']}", "rb") as fh:
            for raw in iter_tar(fh, shard["name"],
                                lambda reason, detail: problems.append(f"{reason}: {detail}")):
                data, caption = raw.image_bytes(), raw.members.get("txt")
                if data is None or caption is None or not _SAFE_KEY.match(raw.key):
                    problems.append(f"unusable held-out sample {raw.key!r}")
                    continue
                text = caption.decode("utf-8")
                if captions == "paraphrase":
                    try:
                        scene = scene_from_dict(json.loads(raw.members["json"])["scene"])
                    except (KeyError, ValueError) as exc:
                        problems.append(f"held-out sample {raw.key!r} has no usable scene: {exc}")
                        continue
                    text = paraphrase_caption(scene, random.Random(f"{cfg.seed}/paraphrase/{raw.key}"))
                path = image_dir / f"{raw.key}.jpg"
                if not path.exists():
                    path.write_bytes(data)
                images.append(RetrievalImage(len(images), str(path), "heldout", (text,)))
    if problems:
        raise ValueError(f"held-out shards under {base} are damaged: {problems[:3]}")
    if len(images) < cfg.num_candidates:
        raise ValueError(f"{manifest_url}: {len(images)} held-out pairs, need {cfg.num_candidates}")
    return images[: cfg.num_candidates], result["pretrain_manifest"]


@torch.no_grad()
def heldout_itm_accuracy(model: Any, collator: TaskCollator, images: list[RetrievalImage], batch_size: int,
                         seed: int = 0, device: torch.device | str = "cpu") -> dict[str, float]:
    """ITM accuracy on N positives + N negatives (captions of other held-out images)."""
    was_training = model.training
    model.eval()
    try:
        n = len(images)
        partner = derangement(n, seed).tolist()
        rows = [(i, i, 1) for i in range(n)] + [(i, partner[i], 0) for i in range(n)]
        preds, labels = [], []
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            b = collator.batch([str(i) for i, _, _ in chunk], [images[i].image_path for i, _, _ in chunk],
                               [images[j].captions[0] for _, j, _ in chunk])
            logits = model.itm_logits(b["pixel_values"].to(device), b["pixel_mask"].to(device),
                                      b["input_ids"].to(device), b["attention_mask"].to(device))
            preds.append(logits.argmax(-1).cpu())
            labels.append(torch.tensor([y for _, _, y in chunk]))
        pred, label = torch.cat(preds), torch.cat(labels)
        return {
            "itm_acc": float((pred == label).float().mean()),
            "itm_acc_pos": float((pred[label == 1] == 1).float().mean()),
            "itm_acc_neg": float((pred[label == 0] == 0).float().mean()),
        }
    finally:
        model.train(was_training)


def _score_set(model: Any, collator: TaskCollator, images: list[RetrievalImage], cfg: HeldoutConfig,
               retrieval: bool, device: torch.device | str) -> dict[str, float]:
    """ITM accuracy (and recall@K both ways, percent, when ``retrieval``) on one caption set."""
    out: dict[str, float] = dict(heldout_itm_accuracy(model, collator, images, cfg.batch_size, cfg.seed,
                                                      device))
    if retrieval:
        result = pretraining_retrieval_eval(model, collator, images, batch_size=cfg.batch_size, device=device)
        out.update({k: round(v, 2) for k, v in result.flat().items()})
    return out


def evaluate_heldout(model: Any, cfg: HeldoutConfig, images: list[RetrievalImage] | None = None,
                     retrieval: bool = True, device: torch.device | str = "cpu",
                     paraphrase_images: list[RetrievalImage] | None = None,
                     paraphrase: bool = True) -> dict[str, Any]:
    """All held-out figures of a ``SohoForPretraining``: ITM accuracy, recall@K both ways (percent; skipped
    when ``retrieval`` is False: N² passes), the same on the paraphrased captions (``para_*``; skipped when
    ``paraphrase`` is False), and the codebook health saved with the model."""
    cfg.validate()
    if images is None:
        images, _ = prepare_heldout(cfg)
    collator = TaskCollator(TaskDataConfig(max_image_side=cfg.image_size,
                                           pad_multiple=model.config.encoder.total_stride,
                                           max_text_len=cfg.max_text_len))
    t0 = time.perf_counter()
    figures = _score_set(model, collator, images, cfg, retrieval, device)
    if paraphrase:
        if paraphrase_images is None:
            paraphrase_images, _ = prepare_heldout(cfg, captions="paraphrase")
        para = _score_set(model, collator, paraphrase_images, cfg, retrieval, device)
        figures.update({f"para_{k}": v for k, v in para.items()})
    health = model.soho.visual_dictionary.health()
    return {
        **figures,
        "num_candidates": len(images),
        "chance_r1": round(100.0 / len(images), 2),
        "vd_usage_ratio": health["usage_ratio"],
        "vd_perplexity": round(float(health["perplexity"]), 2),
        "vd_dead_codes": health["dead_codes"],
        "vd_num_codes": model.config.vd.num_codes,
        "vd_enabled": model.config.vd.enabled,
        "eval_seconds": round(time.perf_counter() - t0, 1),
        "heldout": asdict(cfg),
    }


_PERIODIC_IMAGES: dict[tuple[str, str], list[RetrievalImage]] = {}


def _synthetic_periodic(run: RunConfig, model: Any, device: torch.device | str
                        ) -> tuple[dict[str, float], RetrievalResult, str]:
    """The synthetic held-out split's figures (history fields, retrieval result, a description)."""
    cfg = HeldoutConfig.from_run_config(run, num_candidates=run.observability.eval_candidates)
    sets: dict[str, list[RetrievalImage]] = {}
    for captions in CAPTION_SETS:
        key = (str(heldout_data_dir(cfg)), captions)
        if key not in _PERIODIC_IMAGES:
            _PERIODIC_IMAGES[key], _ = prepare_heldout(cfg, captions=captions)
        sets[captions] = _PERIODIC_IMAGES[key]
    images = sets["generator"]
    collator = TaskCollator(TaskDataConfig(max_image_side=cfg.image_size,
                                           pad_multiple=model.config.encoder.total_stride,
                                           max_text_len=cfg.max_text_len))
    was_training = model.training
    model.eval()
    try:
        itm = heldout_itm_accuracy(model, collator, images, cfg.batch_size, cfg.seed, device)
        result = pretraining_retrieval_eval(model, collator, images, batch_size=cfg.batch_size, device=device)
        para = _score_set(model, collator, sets["paraphrase"], cfg, True, device)
    finally:
        model.train(was_training)
    record = {f"eval_{d}_r{k}": v / 100.0 for d, rec in result.recalls.items() for k, v in rec.items()}
    # the same images with the paraphrased captions (data_pipeline.paraphrase): not exported, history only
    record.update({f"eval_para_{k}": v / 100.0 for k, v in para.items()
                   if k.endswith(("_r1", "_r5", "_r10"))})
    record.update({"eval_itm_acc": itm["itm_acc"], "eval_para_itm_acc": para["itm_acc"],
                   "eval_candidates": len(images)})
    what = (f"synthetic held-out split ({len(images)} candidates, exhaustive ITM; paraphrased captions: ITM "
            f"acc {para['itm_acc']:.3f}, i2t R@1 {para['i2t_r1']:.0f} %, t2i R@1 {para['t2i_r1']:.0f} %)")
    return record, result, what


def periodic_heldout_eval(run: RunConfig, engine: Any, metrics: Any,
                          device: torch.device | str = "cpu") -> dict[str, float]:
    """The ``--eval-every`` evaluation inside the pre-training loop; every rank calls it at the same step.

    Rank 0 evaluates the model being trained, in eval mode, then back to the previous mode: on
    ``--eval-data`` when given (:func:`orchestration.pretrain.data_eval.periodic_eval`: ITM accuracy and
    prefilter + re-rank or exhaustive retrieval on a Karpathy split), otherwise on the first
    ``run.observability.eval_candidates`` held-out pairs of the run's synthetic data (made once, see
    :func:`prepare_heldout`; ITM accuracy and exhaustive ITM retrieval). Where the engine holds full fp32
    weights (ZeRO 0-2, fp32) the live module is used; otherwise (ZeRO-3 partitions, bf16 weights) the fp32
    master weights are consolidated on every rank (a collective) and rank 0 evaluates an fp32 copy. Rank 0
    exports the recalls as ``soho_eval_recall{direction,k}`` (0..1), the ITM accuracy as
    ``soho_eval_itm_accuracy`` and the time the evaluation took (consolidation included: the steps stall for
    it) as ``soho_eval_seconds``; the figures go to every rank (one broadcast, which also keeps the ranks in
    step). Returns the history fields: ``eval_{i2t,t2i}_r{1,5,10}`` (0..1, the exported values),
    ``eval_itm_acc``, ``eval_candidates`` (images in the pool), ``eval_seconds`` (+ ``eval_texts`` and
    ``eval_pairs_scored`` with ``--eval-data``; + ``eval_para_itm_acc`` and ``eval_para_{i2t,t2i}_r{1,5,10}``,
    the paraphrased captions, on the synthetic split)."""
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    t0 = time.perf_counter()
    module = getattr(engine, "module", engine)
    stage = engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else 0
    live = stage < 3 and next(module.parameters()).dtype == torch.float32
    state_dict = None
    if not live:
        state_dict = consolidated_fp32_state_dict(engine)  # collective: every rank takes part
    record: dict[str, float] | None = None
    if rank == 0:
        if live:
            model = module
        else:
            model = SohoForPretraining(module.config, load_pretrained=False)
            # the consolidation also holds the non-persistent buffers (BERT's position_ids), which a state
            # dict does not: load exactly the model's keys, strictly
            model.load_state_dict({k: state_dict[k] for k in model.state_dict()}, strict=True)
            model.to(device)
        if run.observability.eval_data is not None:
            record, result, what = periodic_eval(run, model, device)
        else:
            record, result, what = _synthetic_periodic(run, model, device)
        seconds = time.perf_counter() - t0
        record["eval_seconds"] = round(seconds, 3)
        export_recall(metrics, result)
        metrics.set_eval_figures(record["eval_itm_acc"], seconds)
        logger.info("eval on %s: ITM acc %.3f, i2t R@1 %.3f, t2i R@1 %.3f (%.1f s)", what,
                    record["eval_itm_acc"], record["eval_i2t_r1"], record["eval_t2i_r1"], seconds)
    if world > 1:
        box = [record]
        dist.broadcast_object_list(box, src=0)
        record = box[0]
    assert record is not None
    return record


def evaluate_export(model_dir: str | Path, cfg: HeldoutConfig) -> dict[str, Any]:
    """Load a run's ``final_model`` (``SohoForPretraining.save_pretrained`` format) and evaluate it."""
    model = SohoForPretraining.from_pretrained(str(model_dir))
    return {"model": str(model_dir), **evaluate_heldout(model, cfg)}


def model_from_checkpoint(ckpt_dir: str | Path) -> Any:
    """A ``SohoForPretraining`` from a committed mid-run checkpoint (no export there): the model config
    from its train state, the weights from DeepSpeed's stage-0/1/2 model file (full fp32 weights on every
    rank), loaded with ``weights_only=True``."""
    d = Path(ckpt_dir)
    state = json.loads((d / "train_state.json").read_text())
    files = (sorted(d.glob("ds/*/mp_rank_00_model_states.pt"))
             or sorted(d.glob("ds/mp_rank_00_model_states.pt")))
    if not files:
        raise FileNotFoundError(
            f"{d}: no DeepSpeed mp_rank_00_model_states.pt (ZeRO-3 checkpoints need the export)")
    module = torch.load(files[0], map_location="cpu", weights_only=True)["module"]
    model = SohoForPretraining(SohoConfig.from_dict(state["model_config"]), load_pretrained=False)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in module.items()},
                          strict=True)
    return model


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m orchestration.pretrain.heldout_eval",
                                description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="final_model directory of a pre-training run")
    src.add_argument("--checkpoint", help="a committed checkpoint_step_* directory (mid-run, no export)")
    p.add_argument("--config", type=Path,
                   help="the run's YAML (synthetic_pairs, seed, image_size, max_text_len)")
    p.add_argument("--num-candidates", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--out", type=Path, help="also write the JSON here")
    a = p.parse_args(argv)
    run = RunConfig.from_dict(load_yaml(a.config), source=str(a.config)) if a.config else RunConfig()
    cfg = HeldoutConfig.from_run_config(run, num_candidates=a.num_candidates, batch_size=a.batch_size)
    if a.model:
        result = evaluate_export(a.model, cfg)
    else:
        result = {"checkpoint": a.checkpoint, **evaluate_heldout(model_from_checkpoint(a.checkpoint), cfg)}
    print_result(result, a.out)
    return result


if __name__ == "__main__":  # pragma: no cover
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main()
