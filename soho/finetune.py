"""``python -m soho.finetune --task vqa|nlvr2|snli_ve|retrieval --init CHECKPOINT ...`` — CLI shim; the work is
in :mod:`orchestration.finetune`. ``--help`` lists every option."""

import sys

from orchestration.finetune import main

if __name__ == "__main__":
    main(sys.argv[1:])
