"""End-of-run artefacts from the final train state and the run's history log: ``summary.json`` and
``loss_curve.png``. The per-step history is read from ``{storage}/{run}/history/`` (all attempts of the run,
up to the final checkpoint's step), not from the checkpoint."""

from __future__ import annotations

import io
import json
import logging
import statistics
from typing import Any

import fsspec

from orchestration.checkpoint import HistoryLog

logger = logging.getLogger(__name__)

TASKS = ("loss", "mlm", "mvm", "itm")


def _window_mean(history: list[dict[str, float]], key: str, first: bool, n: int) -> float | None:
    rows = history[:n] if first else history[-n:]
    vals = [r[key] for r in rows if key in r]
    return round(statistics.fmean(vals), 5) if vals else None


def build_summary(state: dict[str, Any], *, wall_seconds: float, storage: dict[str, str]) -> dict[str, Any]:
    """Key figures of a finished run. Loss 'first'/'last' are means over the first/last 10 % of steps
    (at least 5), so one noisy batch cannot fake a fall."""
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
        "total_loss_fell": bool(first_total is not None and last_total is not None and last_total < first_total),
        "final_accuracy": {k: last.get(k) for k in ("mlm_acc", "mvm_acc", "itm_acc")},
        "vd": {"usage_ratio": last.get("vd_usage"), "perplexity": last.get("vd_perplexity")},
        "samples_per_s_median": round(statistics.median(sps), 2) if sps else None,
        "nonfinite_steps": state["nonfinite_steps"],
        "resumes": state["resumes"],
        "wall_seconds": round(wall_seconds, 1),
        **storage,
    }


def plot_history(history: list[dict[str, float]]) -> bytes:
    """PNG: per-task losses (left axis) and VD usage ratio (right axis) over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in history]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for key, label in (("loss", "total"), ("mlm", "MLM"), ("mvm", "MVM"), ("itm", "ITM")):
        ax.plot(steps, [r[key] for r in history], label=label, linewidth=1.6 if key == "loss" else 1.0)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(steps, [r.get("vd_usage", float("nan")) for r in history], color="grey", linestyle="--",
             label="VD usage ratio")
    ax2.set_ylabel("VD usage ratio")
    ax2.set_ylim(0, 1.05)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper right", fontsize=8)
    ax.set_title("SOHO pre-training")
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
) -> dict[str, Any]:
    """Write summary.json, loss_curve.png and final_model/ under ``{storage_path}/{run_name}/``."""
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
    summary = build_summary(state, wall_seconds=wall_seconds, storage=storage)
    if state.get("history"):
        png = plot_history(state["history"])  # rendered before opening: no half-written object on error
        with fs.open(f"{run_dir}/loss_curve.png", "wb") as fh:
            fh.write(png)
        summary["loss_curve"] = f"{display}/loss_curve.png"
    summary["summary"] = f"{display}/summary.json"
    text = json.dumps(summary, indent=1) + "\n"
    with fs.open(f"{run_dir}/summary.json", "w") as fh:
        fh.write(text)
    return summary
