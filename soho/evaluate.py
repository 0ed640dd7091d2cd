"""``python -m soho.evaluate --task vqa|nlvr2|snli_ve|retrieval --checkpoint DIR ...`` (console script
``soho-evaluate``) — CLI shim; the work is in :mod:`orchestration.finetune.launch`."""

import sys

from orchestration.finetune.launch import evaluate_main


def cli(argv: list[str] | None = None) -> int:
    """``soho-evaluate``: exit status 0 once the results are written (``evaluate_main`` returns them)."""
    evaluate_main(sys.argv[1:] if argv is None else argv)
    return 0


if __name__ == "__main__":
    evaluate_main(sys.argv[1:])
