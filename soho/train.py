"""``python -m soho.train`` (or the ``soho-train`` console script) — the CLI shim; all the work is in
:mod:`orchestration`.

With no arguments it runs the embedded default (tiny preset, synthetic shards cached on first use, local
Ray with 2 CPU workers, DeepSpeed ZeRO-2 over gloo). ``python -m soho.train --help`` lists every option.
"""

import sys

from orchestration.pretrain.cli import main


def cli(argv: list[str] | None = None) -> int:
    """``soho-train``: exit status 0 once the run has finished (``main`` returns the run summary)."""
    main(sys.argv[1:] if argv is None else argv)
    return 0


if __name__ == "__main__":
    main()
