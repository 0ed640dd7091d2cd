"""ITM-plateau probe: fast in-process pre-training experiments on the synthetic_cpu data.

Research tool behind docs/RESULTS.md ("Why ITM stayed at chance"): the run's 8,192 pairs are decoded once
into memory (no loader, no DeepSpeed), the tiny preset trains with AdamW, linear warm-up + cosine to 10 % and
the recipe's cold start, and the held-out scenes are evaluated every --eval-every steps with the code of
``orchestration.heldout_eval``. About 0.35 s/step on one core. Besides model overrides (``-o
section.key=value``) it probes: --mlm-weight / --mvm-weight / --itm-weight; --itc W, the model's optional ALBEF-style contrastive
term (``pretrain.itc_weight``); --vis-ln, a parameter-free LayerNorm on the
visual content before the position embedding; --cur-steps / --cur-maxlen, a short-caption curriculum.
Example (the recipe's ITM head):

    python scripts/itm_plateau_probe.py --steps 1000 --eval-every 250 --retrieval --out probe.json \\
        -o pretrain.itm_interaction=true -o vd.restart_dead_codes=true -o vd.dead_code_window=20 \\
        -o vd.decay_warmup_steps=100 -o pretrain.mvm_prob=0.3 -o transformer.hidden_dropout=0.0 \\
        -o transformer.attention_dropout=0.0 -o transformer.initializer_range=0.02
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from data_pipeline.loader import LoaderConfig, PretrainLoader
from orchestration.config import apply_model_overrides
from orchestration.heldout_eval import HeldoutConfig, evaluate_model, prepare_heldout
from soho import SohoForPretraining
from soho.config import get_preset


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--bs", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--freeze", type=int, default=50, help="cold start: trunk frozen for this many steps")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--pairs", type=int, default=8192)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-n", type=int, default=100)
    p.add_argument("--retrieval", action="store_true", help="also zero-shot retrieval at the last step")
    p.add_argument("--itm-weight", type=float, default=1.0)
    p.add_argument("--mlm-weight", type=float, default=1.0)
    p.add_argument("--mvm-weight", type=float, default=1.0)
    p.add_argument("--itc", type=float, default=0.0, help="shorthand for -o pretrain.itc_weight=W")
    p.add_argument("--vis-ln", action="store_true")
    p.add_argument("--cur-steps", type=int, default=0)
    p.add_argument("--cur-maxlen", type=int, default=14)
    p.add_argument("--seed", type=int, default=0, help="model init, batch order and masking")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache-dir", default="/tmp", help="decoded tensors of the data, kept between runs")
    p.add_argument("--save", help="save the final model here (SohoForPretraining.save_pretrained)")
    p.add_argument("--out", help="history + held-out evaluations as JSON")
    p.add_argument("-o", "--override", action="append", default=[])
    return p.parse_args(argv)


def load_pairs(manifest: str, a: argparse.Namespace, stride: int) -> dict[str, torch.Tensor]:
    cache = Path(a.cache_dir) / f"probe_data_{a.pairs}_{a.size}.pt"
    if cache.exists():
        return torch.load(cache)
    loader = PretrainLoader(LoaderConfig(urls=manifest, batch_size=512, max_image_side=a.size, pad_multiple=stride,
                                         max_text_len=48, seed=0, shuffle_buffer=1, epochs=1))
    pixels, ids = [], []
    for b in loader:
        pixels.append(b["pixel_values"])
        ids.append(b["input_ids"])
    width = max(x.shape[1] for x in ids)
    data = {"pv": torch.cat(pixels), "ids": torch.cat([F.pad(x, (0, width - x.shape[1])) for x in ids])}
    torch.save(data, cache)
    return data


def patch_visual_layernorm() -> None:
    """--vis-ln: LayerNorm the VD output before VisualEmbeddings adds the 2-D position (probe only)."""
    import soho.embeddings as emb

    original = emb.VisualEmbeddings.forward

    def forward(self, tokens, grid, type_embeddings, masked_positions=None):  # noqa: ANN001, ANN202
        return original(self, F.layer_norm(tokens, tokens.shape[-1:]), grid, type_embeddings, masked_positions)

    emb.VisualEmbeddings.forward = forward


def lr_at(a: argparse.Namespace, step: int) -> float:
    if step <= a.warmup:
        return a.lr * step / max(1, a.warmup)
    progress = (step - a.warmup) / max(1, a.steps - a.warmup)
    return a.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    hcfg = HeldoutConfig(synthetic_pairs=a.pairs, seed=0, num_candidates=a.eval_n, image_size=a.size,
                         max_text_len=48, batch_size=200)
    images, manifest = prepare_heldout(hcfg)
    if a.vis_ln:
        patch_visual_layernorm()
    overrides = [*a.override, *([f"pretrain.itc_weight={a.itc}"] if a.itc > 0 else [])]
    cfg = apply_model_overrides(get_preset("tiny"), overrides)
    model = SohoForPretraining(cfg)
    data = load_pairs(manifest, a, cfg.encoder.total_stride)
    n = data["pv"].shape[0]
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(a.seed)
    perm, pos = torch.randperm(n, generator=g), 0
    short = ((data["ids"] != 0).sum(1) <= a.cur_maxlen).nonzero().flatten()
    history: list[dict[str, Any]] = []
    t0 = time.time()
    for step in range(1, a.steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr_at(a, step)
        model.soho.set_backbone_trainable(step > a.freeze)
        if pos + a.bs > n:
            perm, pos = torch.randperm(n, generator=g), 0
        idx, pos = perm[pos : pos + a.bs], pos + a.bs
        if step <= a.cur_steps:
            idx = short[torch.randint(len(short), (a.bs,), generator=g)]
        ids = data["ids"][idx]
        am = (ids != 0).long()
        t_len = int(am.sum(1).max())
        ids, am = ids[:, :t_len], am[:, :t_len]
        out = model(data["pv"][idx], None, ids, am, generator=g)
        loss = a.mlm_weight * out.mlm_loss + a.mvm_weight * out.mvm_loss + a.itm_weight * out.itm_loss
        loss = loss + cfg.pretrain.itc_weight * out.itc_loss
        itc_loss, itc_acc = out.itc_loss, float(out.itc_acc)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append({"step": step, "mlm": out.mlm_loss.item(), "mvm": out.mvm_loss.item(),
                        "itm": out.itm_loss.item(), "itm_acc": out.itm_acc.item(), "itc": itc_loss.item(),
                        "itc_acc": itc_acc})
        if step % 25 == 0:
            w = history[-25:]
            means = {k: sum(r[k] for r in w) / len(w) for k in ("mlm", "mvm", "itm", "itm_acc", "itc_acc")}
            print(f"step {step} {time.time() - t0:.0f}s " + " ".join(f"{k} {v:.3f}" for k, v in means.items()),
                  flush=True)
        if step % a.eval_every == 0 or step == a.steps:
            ev = evaluate_model(model, hcfg, images, retrieval=a.retrieval and step == a.steps)
            history[-1]["eval"] = {k: v for k, v in ev.items() if k != "heldout"}
            print("EVAL", step, {k: v for k, v in ev.items() if k.startswith(("itm", "t2i", "i2t", "vd_"))},
                  flush=True)
    if a.save:
        model.save_pretrained(a.save)
    result = {"args": vars(a), "hist": history}
    if a.out:
        Path(a.out).write_text(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
