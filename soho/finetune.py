"""``python -m soho.finetune --task vqa|nlvr2|snli_ve|retrieval --init CHECKPOINT ...`` (console script
``soho-finetune``) — CLI shim; the work is in :mod:`orchestration.finetune.launch`. ``--help`` lists every
option."""

import sys

from orchestration.finetune.launch import main


def cli(argv: list[str] | None = None) -> int:
    """``soho-finetune``: exit status 0 once fine-tuning and its evaluation are written (``main`` returns
    them)."""
    main(sys.argv[1:] if argv is None else argv)
    return 0


if __name__ == "__main__":
    main(sys.argv[1:])
