"""Command line: ``python -m data_pipeline {shard,synth,merge-manifests}`` (console scripts ``soho-data`` and
``soho-shard`` = ``soho-data shard``); ``main(argv)`` for tests."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from data_pipeline import shard, synth
from data_pipeline.storage import refuse_secret_flags, s3_storage_options


def _add_storage_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("object storage (s3://); unset values come from the standard AWS_* variables")
    g.add_argument("--s3-endpoint-url", default=None,
                   help="e.g. http://127.0.0.1:9000 for MinIO or moto (default: $AWS_ENDPOINT_URL_S3 or "
                        "$AWS_ENDPOINT_URL, else AWS)")
    g.add_argument("--s3-region", default=None,
                   help="region of the S3 bucket (default: boto's, e.g. $AWS_DEFAULT_REGION)")
    refuse_secret_flags(g)  # credentials only from AWS_* / a credentials file, never argv


def _storage_options(args: argparse.Namespace) -> dict[str, Any]:
    return s3_storage_options(args.s3_endpoint_url, args.s3_region)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("synth", help="synthetic scenes + downstream ground truth")
    synth.add_cli_arguments(p)
    _add_storage_flags(p)
    shard.add_cli_subcommands(sub, _add_storage_flags)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "synth":
        return synth.run_cli(args, _storage_options(args))
    return args.run(args, _storage_options(args))


def shard_main(argv: list[str] | None = None) -> int:
    """``soho-shard ARGS`` = ``python -m data_pipeline shard ARGS``."""
    return main(["shard", *(sys.argv[1:] if argv is None else argv)])
