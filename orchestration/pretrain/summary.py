"""End-of-run artefacts from the final train state and the run's history log: ``summary.json`` and
``loss_curve.png``. The per-step history is read from ``{storage}/{run}/history/`` (all attempts of the run,
up to the final checkpoint's step), not from the checkpoint. With ``--final-eval`` the held-out figures of the
final model (:func:`orchestration.pretrain.heldout_eval.evaluate_model`) go into both under ``heldout``."""

from __future__ import annotations

import io
import json
import logging
import statistics
from typing import Any

import fsspec

from orchestration.runtime.checkpoint import HistoryLog

logger = logging.getLogger(__name__)

TASKS = ("loss", "mlm", "mvm", "itm")
# What summary.json keeps of a held-out evaluation (recalls in percent, accuracies and usage 0..1).
HELDOUT_KEYS = ("num_candidates", "itm_acc", "itm_acc_pos", "itm_acc_neg", "t2i_r1", "t2i_r5", "t2i_r10",
                "i2t_r1", "i2t_r5", "i2t_r10", "chance_r1", "vd_usage_ratio", "vd_perplexity",
                "vd_dead_codes", "vd_num_codes", "eval_seconds",
                # the synthetic split's paraphrased captions (data_pipeline.paraphrase)
                "para_itm_acc", "para_itm_acc_pos", "para_itm_acc_neg", "para_t2i_r1", "para_t2i_r5",
                "para_t2i_r10", "para_i2t_r1", "para_i2t_r5", "para_i2t_r10",
                # --eval-data: which split and how it was ranked
                "source", "mode", "num_texts", "prefilter_k", "pairs_scored")


def _window_mean(history: list[dict[str, float]], key: str, first: bool, n: int) -> float | None:
    rows = history[:n] if first else history[-n:]
    vals = [r[key] for r in rows if key in r]
    return round(statistics.fmean(vals), 5) if vals else None


def build_summary(state: dict[str, Any], *, wall_seconds: float, storage: dict[str, str],
                  heldout: dict[str, Any] | None = None) -> dict[str, Any]:
    """Key figures of a finished run. Loss 'first'/'last' are means over the first/last 10 % of steps
    (at least 5), so one noisy batch cannot fake a fall. ``heldout``: the final model's held-out evaluation
    (kept as ``heldout``: ITM accuracy, recall@K in percent among ``num_candidates``, codebook health).
    ``evals``: every periodic evaluation of the history (``--eval-every``), its step and ``eval_*`` figures;
    ``init_from``: the warm start's source and checksums (``--init-from``), or None."""
    history: list[dict[str, float]] = state.get("history", [])
    n = max(5, len(history) // 10)
    losses = {}
    for key in TASKS:
        first, last = _window_mean(history, key, True, n), _window_mean(history, key, False, n)
        losses[key] = {"first": first, "last": last}
    first_total, last_total = losses["loss"]["first"], losses["loss"]["last"]
    sps = [r["samples_per_s"] for r in history[len(history) // 5:] if "samples_per_s" in r]
    last = history[-1] if history else {}
    return {
        "run_name": state["config"]["run_name"],
        "preset": state["config"]["preset"],
        "steps": state["step"],
        "samples_seen": state["samples_seen"],
        "world_size": state["world_size"],
        "zero_stage": state["config"]["zero_stage"],
        "precision": state["config"]["precision"],
        "losses": losses,
        "total_loss_fell": bool(first_total is not None and last_total is not None
                                and last_total < first_total),
        "final_accuracy": {k: last.get(k) for k in ("mlm_acc", "mvm_acc", "itm_acc")},
        "vd": {"usage_ratio": last.get("vd_usage"), "perplexity": last.get("vd_perplexity")},
        "samples_per_s_median": round(statistics.median(sps), 2) if sps else None,
        "nonfinite_steps": state["nonfinite_steps"],
        "resumes": state["resumes"],
        "init_from": state.get("init_from"),
        "evals": [{k: v for k, v in r.items() if k == "step" or k.startswith("eval_")}
                  for r in history if "eval_itm_acc" in r],
        **({"heldout": {k: heldout[k] for k in HELDOUT_KEYS if k in heldout}} if heldout else {}),
        "wall_seconds": round(wall_seconds, 1),
        **storage,
    }


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (NaN-free input), so a noisy per-batch accuracy shows its trend."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_history(history: list[dict[str, float]], heldout: dict[str, Any] | None = None) -> bytes:
    """PNG, two panels over steps: per-task losses (top); training ITM accuracy and ITC in-batch top-1
    (moving averages), VD usage ratio and perplexity / codebook size, and the final held-out ITM accuracy
    and t2i R@1 when evaluated (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in history]
    fig, (ax, acc) = plt.subplots(2, 1, figsize=(8, 7.5), dpi=100, sharex=True)
    for key, label in (("loss", "total"), ("mlm", "MLM"), ("mvm", "MVM"), ("itm", "ITM"), ("itc", "ITC")):
        if all(key in r for r in history) and (key != "itc" or any(r[key] for r in history)):
            ax.plot(steps, [r[key] for r in history], label=label, linewidth=1.6 if key == "loss" else 1.0)
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title("SOHO pre-training")
    window = max(1, len(history) // 25)
    for key, label in (("itm_acc", "ITM accuracy (train batch)"), ("itc_acc", "ITC top-1 in batch (train)")):
        if all(key in r for r in history) and (key != "itc_acc" or any(r[key] for r in history)):
            acc.plot(steps, smooth([r[key] for r in history], window), label=f"{label}, mean of {window}")
    acc.plot(steps, [r.get("vd_usage", float("nan")) for r in history], color="grey", linestyle="--",
             label="VD usage ratio")
    codes = (heldout or {}).get("vd_num_codes")
    if codes:
        acc.plot(steps, [r.get("vd_perplexity", float("nan")) / codes for r in history], color="grey",
                 linestyle=":", label=f"VD perplexity / {codes} codes")
    if heldout and steps:
        n = heldout.get("num_candidates")
        acc.scatter([steps[-1]], [heldout["itm_acc"]], marker="*", s=120, color="tab:red", zorder=3,
                    label=f"held-out ITM accuracy ({heldout['itm_acc']:.2f})")
        if "t2i_r1" in heldout:
            acc.scatter([steps[-1]], [heldout["t2i_r1"] / 100.0], marker="D", s=50, color="tab:purple",
                        zorder=3, label=f"held-out t2i R@1 among {n} ({heldout['t2i_r1']:.0f} %)")
    acc.axhline(0.5, color="black", linewidth=0.6, alpha=0.4)
    acc.set_ylim(0, 1.05)
    acc.set_xlabel("step")
    acc.set_ylabel("accuracy / ratio")
    acc.grid(alpha=0.3)
    acc.legend(loc="lower center", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def write_run_artifacts(
    state: dict[str, Any],
    export_dir: str | None,
    storage_path: str,
    run_name: str,
    storage_options: dict[str, Any],
    wall_seconds: float,
    heldout: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write summary.json, loss_curve.png and final_model/ under ``{storage_path}/{run_name}/``; ``heldout``:
    the final model's held-out evaluation, if one was made."""
    fs, root = fsspec.core.url_to_fs(storage_path, **storage_options)
    run_dir = f"{root.rstrip('/')}/{run_name}"
    fs.makedirs(run_dir, exist_ok=True)
    proto = fs.protocol[0] if isinstance(fs.protocol, tuple) else fs.protocol
    display = run_dir if proto in ("file", "local") else f"{proto}://{run_dir}"
    storage = {"run_dir": display}
    if "history" not in state:  # format 2: the history lives beside the checkpoints, not inside them
        state = {**state, "history": HistoryLog(fs, run_dir).read(upto=int(state["step"]))}
    if export_dir is not None:
        dst = f"{run_dir}/final_model"
        if fs.exists(dst):
            fs.rm(dst, recursive=True)
        fs.makedirs(dst, exist_ok=True)
        fs.put(export_dir.rstrip("/") + "/", dst + "/", recursive=True)
        storage["final_model"] = f"{display}/final_model"
    summary = build_summary(state, wall_seconds=wall_seconds, storage=storage, heldout=heldout)
    if state.get("history"):
        # rendered before opening: no half-written object on error
        png = plot_history(state["history"], summary.get("heldout"))
        with fs.open(f"{run_dir}/loss_curve.png", "wb") as fh:
            fh.write(png)
        summary["loss_curve"] = f"{display}/loss_curve.png"
    summary["summary"] = f"{display}/summary.json"
    text = json.dumps(summary, indent=1) + "\n"
    with fs.open(f"{run_dir}/summary.json", "w") as fh:
        fh.write(text)
    return summary
