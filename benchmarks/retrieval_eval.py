"""Exhaustive ITM ranking vs prefilter + rerank on N image-text pairs (one caption per image), one run.

    python benchmarks/retrieval_eval.py [--n 1000] [--k 16] [--checkpoint FINETUNED_RETRIEVAL_DIR]
                                        [--train-steps 200] [--device cuda]

Without --checkpoint, a tiny-preset retrieval model is fine-tuned on the synthetic train split first
(`--train-steps`), so both rankings come from a model that has learnt something. Prints each method's time,
the time ratio (target ≥10×) and the recall@1/5/10 difference in both directions.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from data_pipeline.downstream import TaskCollator, TaskDataConfig, read_karpathy
from data_pipeline.synth import SynthConfig, make_synthetic
from orchestration.finetune.config import FinetuneConfig
from orchestration.finetune.worker import finetune_worker
from orchestration.runtime.evaluation import encode_retrieval_set
from soho.downstream.modeling import SohoForRetrieval
from soho.downstream.retrieval import exhaustive_retrieval, prefilter_rerank_retrieval


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1000, help="pairs (images, one caption each)")
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--train-steps", type=int, default=200)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="soho-retrieval-bench-"))
    synth = make_synthetic(str(work / "synth"), num=16, seed=0, image_size=args.image_size,
                           config=SynthConfig(retrieval_images=(512, 8, args.n),
                                              retrieval_captions_per_image=1))  # fmt: skip
    ckpt = args.checkpoint
    if ckpt is None:
        finetune_worker(FinetuneConfig.of(task="retrieval", data=synth["downstream"], output=str(work / "ft"),
                                       engine="torch", image_size=args.image_size, micro_batch_size=16,
                                       max_steps=args.train_steps, lr=5e-4, skip_eval=True,
                                       progress=True))  # fmt: skip
        ckpt = str(work / "ft" / "model")
    model = SohoForRetrieval.from_pretrained(ckpt).to(args.device).eval()
    images = read_karpathy(synth["retrieval"], synth["downstream"], "test")[: args.n]
    coll = TaskCollator(
        TaskDataConfig(max_image_side=args.image_size, pad_multiple=model.config.encoder.total_stride)
    )
    with torch.inference_mode():
        t0 = time.perf_counter()
        visual, text, owner = encode_retrieval_set(model, coll, images, 64, args.device, max_captions=1)
        t_enc = time.perf_counter() - t0
        ids, am = text["input_ids"], text["attention_mask"]

        def score(i: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            i, t = i.to(ids.device), t.to(ids.device)
            return model.itm_score(visual[i], ids[t], am[t])

        t0 = time.perf_counter()
        img_emb = torch.cat(
            [model.image_embedding(visual[i : i + 64]) for i in range(0, len(images), 64)]
        ).cpu()
        txt_emb = torch.cat(
            [model.text_embedding(ids[i : i + 64], am[i : i + 64]) for i in range(0, len(owner), 64)]
        ).cpu()
        t_emb = time.perf_counter() - t0
        fast = prefilter_rerank_retrieval(score, img_emb, txt_emb, owner, args.k, batch_size=args.batch_size)
        t_fast = t_emb + sum(fast.seconds.values())
        full, _ = exhaustive_retrieval(score, owner, len(images), batch_size=args.batch_size)
        t_full = sum(full.seconds.values())
    print(f"N={len(images)} k={args.k} device={args.device} (image encoding, shared: {t_enc:.1f}s)")
    print(f"exhaustive: {full.pairs_scored} ITM pairs, {t_full:.1f}s, {full.flat()}")
    print(f"prefilter+rerank: {fast.pairs_scored} ITM pairs, {t_fast:.1f}s, {fast.flat()}")
    diff = {key: round(fast.flat()[key] - v, 2) for key, v in full.flat().items()}
    print(f"time ratio {t_full / t_fast:.1f}x; recall difference (fast - exhaustive) {diff}")


if __name__ == "__main__":
    main()
