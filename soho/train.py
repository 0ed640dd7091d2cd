"""``python -m soho.train`` — the CLI shim; all the work is in :mod:`orchestration`.

With no arguments it runs the embedded default (tiny preset, synthetic shards cached on first use, local
Ray with 2 CPU workers, DeepSpeed ZeRO-2 over gloo). ``python -m soho.train --help`` lists every option.
"""

from orchestration.cli import main

if __name__ == "__main__":
    main()
