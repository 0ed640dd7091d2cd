"""``python -m soho.train``: parse the run config (flags > YAML > defaults) and launch.

Exit status 0 on success; the run summary (also written as ``summary.json`` beside the checkpoints) is
printed as JSON on the last line so scripts and CI can read it.
"""

from __future__ import annotations

import json
import logging
import sys

from orchestration.pretrain.config import RunConfig, parse_cli, resolved_config
from orchestration.pretrain.init_from import check_model_config, source_model_config
from orchestration.pretrain.launch import launch_local, launch_ray
from soho.encoder import ensure_trunk_weights

logger = logging.getLogger(__name__)


def preflight(cfg: RunConfig) -> None:
    """Fail here, before any worker starts, when the trunk's initial weights cannot be had (an offline
    machine without torchvision's cache): Ray would otherwise restart the failing workers max_failures
    times and bury the message. Downloads them into this machine's cache when it is online. With
    ``--init-from`` no initial weights are needed; the source's model config is checked instead (from its
    JSON; the worker verifies and loads the tensors)."""
    if cfg.init_from:
        check_model_config(source_model_config(cfg.init_from, cfg.storage_options()), cfg.model_config(),
                           cfg.init_from)
        return
    ensure_trunk_weights(cfg.model_config().encoder)


def main(argv: list[str] | None = None) -> dict:
    cfg, print_config = parse_cli(argv)
    if print_config:
        resolved = resolved_config(cfg)
        print(json.dumps(resolved, indent=1), flush=True)
        return resolved
    preflight(cfg)
    summary = launch_ray(cfg) if cfg.scale.launcher == "ray" else launch_local(cfg)
    if summary.get("losses"):
        first, last = summary["losses"]["loss"]["first"], summary["losses"]["loss"]["last"]
        print(
            f"run {cfg.name}: {summary['steps']} steps, total loss {first} -> {last}, "
            f"summary {summary.get('summary')}, model {summary.get('final_model')}",
            flush=True,
        )
        held = summary.get("heldout")
        if held and "source" in held:  # --eval-data
            src = held["source"]
            print(
                f"evaluation on {src['eval_data']} {src['split']} ({held['num_candidates']} images, "
                f"{held['num_texts']} captions, {held['mode']}): ITM accuracy {held['itm_acc']:.3f} "
                f"(chance 0.5), zero-shot R@1 text->image {held['t2i_r1']:.1f} % / image->text "
                f"{held['i2t_r1']:.1f} %, R@10 {held['t2i_r10']:.1f} % / {held['i2t_r10']:.1f} % (chance R@1 "
                f"{held['chance_r1']:g} %)",
                flush=True,
            )
        elif held:
            print(
                f"held-out ({held['num_candidates']} scenes never trained on): ITM accuracy "
                f"{held['itm_acc']:.3f} (chance 0.5), zero-shot R@1 text->image {held['t2i_r1']:.0f} % / "
                f"image->text {held['i2t_r1']:.0f} % (chance {held['chance_r1']:g} %), VD usage "
                f"{held['vd_usage_ratio']:.2f}, perplexity {held['vd_perplexity']:.1f} of "
                f"{held['vd_num_codes']} codes",
                flush=True,
            )
        print(json.dumps({k: v for k, v in summary.items() if k != "worker"}), flush=True)
    return summary


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
