"""``python -m soho.evaluate --task vqa|nlvr2|snli_ve|retrieval --checkpoint DIR ...`` — CLI shim; the work
is in :mod:`orchestration.finetune`."""

import sys

from orchestration.finetune import evaluate_main

if __name__ == "__main__":
    evaluate_main(sys.argv[1:])
