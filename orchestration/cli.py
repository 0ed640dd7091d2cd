"""``python -m soho.train``: parse the run config (flags > YAML > defaults) and launch.

Exit status 0 on success; the run summary (also written as ``summary.json`` beside the checkpoints) is
printed as JSON on the last line so scripts and CI can read it.
"""

from __future__ import annotations

import json
import logging
import sys

from orchestration.config import parse_run_config

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_run_config(argv)
    if cfg.launcher == "ray":
        from orchestration.launch import launch_ray

        summary = launch_ray(cfg)
    else:
        from orchestration.launch import launch_local

        summary = launch_local(cfg)
    if summary.get("losses"):
        first, last = summary["losses"]["loss"]["first"], summary["losses"]["loss"]["last"]
        print(
            f"run {cfg.name}: {summary['steps']} steps, total loss {first} -> {last}, "
            f"summary {summary.get('summary')}, model {summary.get('final_model')}",
            flush=True,
        )
        print(json.dumps({k: v for k, v in summary.items() if k != "worker"}), flush=True)
    return summary


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
