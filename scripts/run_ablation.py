"""The visual-dictionary ablation (and any recipe comparison): same data, budget and seed, one run per
variant through the real CLI (``python -m soho.train --launcher local``), then held-out ITM accuracy,
zero-shot retrieval and codebook health of each final model (:mod:`orchestration.pretrain.heldout_eval`).

    python scripts/run_ablation.py --config configs/synthetic_cpu.yaml --max-steps 300 \\
        --out docs/results/ablation.json

Default variants: the recipe as configured ("vd"), the recipe without the visual dictionary ("no_vd": grid
features straight into the transformer, MVM off) and two other EMA decays γ. ``--variant name=overrides``
replaces the list (overrides are ``section.key=value`` model overrides appended to the config's own).
Each run's step history is kept in the JSON, so docs/results plots can be redrawn without rerunning.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from configcli import load_yaml
from orchestration.pretrain.config import RunConfig
from orchestration.pretrain.heldout_eval import HeldoutConfig, evaluate_export, prepare_heldout
from orchestration.pretrain.summary import smooth

logger = logging.getLogger("run_ablation")

DEFAULT_VARIANTS = (
    "vd=",
    "no_vd=vd.enabled=false,pretrain.mvm_prob=0",
    "gamma_0.5=vd.decay=0.5",
    "gamma_0.99=vd.decay=0.99",
)


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, sep, overrides = text.partition("=")
    if not sep or not name.strip():
        raise ValueError(f"--variant {text!r}: expected name=override,override,... (overrides may be empty)")
    return name.strip(), [o for o in overrides.split(",") if o.strip()]


def run_variant(config: Path, name: str, overrides: list[str], data_url: str, storage: Path,
                extra_flags: list[str]) -> dict[str, Any]:
    """Train one variant in a fresh process; returns its summary and step history."""
    base = RunConfig.from_dict(load_yaml(config), source=str(config))
    all_overrides = [*base.model_overrides, *overrides]
    # With --eval-every in the recipe the run needs the embedded data (the only kind with a held-out split);
    # its pre-training scenes are the same as data_url's (held-out scenes come from their own stream).
    data = [] if base.observability.eval_every else ["--data", data_url]
    cmd = [sys.executable, "-m", "soho.train", "--config", str(config), "--launcher", "local",
           "--num-workers", "1", *data, "--storage-path", str(storage), "--run-name", name,
           "--metrics-port", "-1", *extra_flags]
    if all_overrides:
        cmd += ["--model-overrides", ",".join(all_overrides)]
    t0 = time.perf_counter()
    logger.info("variant %s: %s", name, " ".join(cmd))
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    run_dir = storage / name
    summary = json.loads((run_dir / "summary.json").read_text())
    from orchestration.runtime.checkpoint import read_history

    history = read_history(str(storage), name)
    return {"summary": summary, "history": history, "overrides": all_overrides,
            "wall_seconds": round(time.perf_counter() - t0, 1), "final_model": str(run_dir / "final_model")}


def plot_results(results: dict[str, Any], out_dir: Path, prefix: str) -> list[Path]:
    """PNGs from a results JSON: per variant the losses, training accuracies and codebook health over
    steps; with more than one variant also a held-out comparison bar chart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    variants = results["variants"]
    has_eval = any("eval_itm_acc" in r for rec in variants.values() for r in rec["history"])
    fig, axes = plt.subplots(1, 4 if has_eval else 3, figsize=(21 if has_eval else 16, 4.5), dpi=90)
    for name, rec in variants.items():
        hist = rec["history"]
        steps = [r["step"] for r in hist]
        k = rec["heldout"]["vd_num_codes"]
        w = max(1, len(hist) // 40)
        axes[0].plot(steps, smooth([r["loss"] for r in hist], w), label=f"{name}: total")
        if len(variants) == 1:
            itc = any(r.get("itc", 0.0) for r in hist)  # runs with pretrain.itc_weight > 0
            for key in ("mlm", "mvm", "itm", *(("itc",) if itc else ())):
                axes[0].plot(steps, smooth([r[key] for r in hist], w), label=key.upper(), linewidth=1)
            for key in ("itm_acc", "mvm_acc", "mlm_acc", *(("itc_acc",) if itc else ())):
                axes[1].plot(steps, smooth([r[key] for r in hist], w), label=key)
        else:
            axes[1].plot(steps, smooth([r["itm_acc"] for r in hist], w), label=f"{name}: itm_acc")
        if rec["heldout"]["vd_enabled"]:
            axes[2].plot(steps, [r["vd_usage"] for r in hist], label=f"{name}: usage ratio")
            axes[2].plot(steps, [r["vd_perplexity"] / k for r in hist], linestyle="--",
                         label=f"{name}: perplexity / k")
            if len(variants) == 1 and "vd_dead_codes" in hist[0]:
                axes[2].plot(steps, [r["vd_dead_codes"] / k for r in hist], linestyle=":",
                             label="dead codes / k")
        evals = [r for r in hist if "eval_itm_acc" in r]  # --eval-every entries (held-out, 0..1)
        if has_eval and evals:
            es = [r["step"] for r in evals]
            axes[3].plot(es, [r["eval_itm_acc"] for r in evals], marker="o", label=f"{name}: ITM acc")
            axes[3].plot(es, [r["eval_t2i_r1"] for r in evals], marker="s", linestyle="--",
                         label=f"{name}: t2i R@1")
            axes[3].plot(es, [r["eval_i2t_r1"] for r in evals], marker="^", linestyle=":",
                         label=f"{name}: i2t R@1")
            if all("eval_para_itm_acc" in r for r in evals):  # the paraphrased captions of the same scenes
                for key, marker, label in (("itm_acc", "o", "ITM acc"), ("t2i_r1", "s", "t2i R@1"),
                                           ("i2t_r1", "^", "i2t R@1")):
                    axes[3].plot(es, [r[f"eval_para_{key}"] for r in evals], marker=marker, alpha=0.5,
                                 linestyle="-.", label=f"{name}: paraphrases {label}")
    if has_eval:
        axes[3].set_title("held-out scenes during training (100 candidates)")
        axes[3].set_ylim(0, 1.02)
    axes[0].set_title("training losses (trailing mean)")
    axes[1].set_title("training-batch accuracies (trailing mean)")
    axes[2].set_title("visual dictionary health")
    axes[2].axhline(0.5, color="grey", linewidth=0.8)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / f"{prefix}_curves.png"
    fig.savefig(path)
    plt.close(fig)
    written.append(path)
    if len(variants) > 1:
        names = list(variants)
        fig, ax = plt.subplots(figsize=(9, 4.5), dpi=90)
        metrics = (("itm_acc", 100.0, "held-out ITM acc %"), ("t2i_r1", 1.0, "t2i R@1 %"),
                   ("i2t_r1", 1.0, "i2t R@1 %"), ("vd_usage_ratio", 100.0, "VD usage %"))
        width = 0.8 / len(metrics)
        for j, (key, scale, label) in enumerate(metrics):
            ax.bar([i + j * width for i in range(len(names))],
                   [variants[n]["heldout"][key] * scale for n in names], width, label=label)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names)
        ax.set_ylim(0, 105)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
        ax.set_title(f"VD ablation, {results['max_steps']} steps each, seed {results['seed']}")
        fig.tight_layout()
        path = out_dir / f"{prefix}_heldout.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, required=True,
                   help="the recipe YAML (e.g. configs/synthetic_cpu.yaml)")
    p.add_argument("--variant", action="append", help="name=overrides (repeatable); default: the VD ablation")
    p.add_argument("--max-steps", type=int, help="budget per variant (default: the config's)")
    p.add_argument("--seed", type=int,
                   help="the replicate (default: the config's): model init, data order and the synthetic "
                        "scenes, held-out ones included, all follow it")
    p.add_argument("--storage", type=Path, default=Path("runs/ablation"), help="where the runs go")
    p.add_argument("--out", type=Path, required=True, help="results JSON")
    p.add_argument("--num-candidates", type=int, default=100)
    p.add_argument("--plot-dir", type=Path,
                   help="also draw PNGs here (from --out; with --plot-only, no runs)")
    p.add_argument("--plot-only", action="store_true")
    a = p.parse_args(argv)
    if a.plot_only:
        results = json.loads(a.out.read_text())
        plot_results(results, a.plot_dir or a.out.parent, a.out.stem)
        return results
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run = RunConfig.from_dict(load_yaml(a.config), source=str(a.config))
    if a.seed is not None:
        run = run.replace(seed=a.seed)
    variants = [parse_variant(v) for v in (a.variant or DEFAULT_VARIANTS)]
    hcfg = HeldoutConfig.from_run_config(run, num_candidates=a.num_candidates)
    images, data_url = prepare_heldout(hcfg)  # the same scenes the embedded data would hold, plus held-out
    extra = ["--max-steps", str(a.max_steps)] if a.max_steps else []
    extra += ["--seed", str(run.seed)]
    results: dict[str, Any] = {"config": str(a.config), "max_steps": a.max_steps or run.optim.max_steps,
                               "seed": run.seed, "variants": {}}
    if a.out.exists():  # resume a partly done comparison: keep finished variants
        done = json.loads(a.out.read_text())
        if all(done.get(k) == results[k] for k in ("config", "max_steps", "seed")):
            results["variants"] = done.get("variants", {})
    for name, overrides in variants:
        if name in results["variants"]:
            logger.info("variant %s already done", name)
            continue
        rec = run_variant(a.config, name, overrides, data_url, a.storage, extra)
        rec["heldout"] = evaluate_export(rec.pop("final_model"), hcfg)
        results["variants"][name] = rec
        h = rec["heldout"]
        logger.info("variant %s: itm_acc %.3f  t2i_r1 %.1f  i2t_r1 %.1f  VD usage %.2f perplexity %.1f",
                    name, h["itm_acc"], h["t2i_r1"], h["i2t_r1"], h["vd_usage_ratio"], h["vd_perplexity"])
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(results, indent=1) + "\n")
    if a.plot_dir:
        plot_results(results, a.plot_dir, a.out.stem)
    return results


if __name__ == "__main__":  # pragma: no cover
    main()
