"""fsspec helpers: open any URL (plain path, file://, s3://, memory://) and commit files atomically.

Why the care: fsspec/s3fs complete an upload in ``__exit__`` even when the body raised, which publishes a
truncated object that looks valid. We therefore build each file in memory, upload it under a temporary
name and only then move it to its final name; readers never see a partial shard or manifest.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import uuid
from typing import Any

import fsspec
from fsspec import AbstractFileSystem

logger = logging.getLogger(__name__)


def s3_storage_options(endpoint_url: str | None = None, region: str | None = None) -> dict[str, Any]:
    """s3fs options from the non-secret flags; credentials always come from the standard AWS chain
    (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, AWS_SHARED_CREDENTIALS_FILE,
    AWS_PROFILE)."""
    opts: dict[str, Any] = {}
    endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    client_kwargs: dict[str, Any] = {}
    if endpoint_url:
        client_kwargs["endpoint_url"] = endpoint_url
    if region:
        client_kwargs["region_name"] = region
    if client_kwargs:
        opts["client_kwargs"] = client_kwargs
    return opts


# Flags that would put a credential into argv (visible in `ps`, shell history, Ray's job info): refused with
# the variable to use instead. Registered by every CLI that touches object storage.
SECRET_FLAGS = {"--s3-secret-key": "AWS_SECRET_ACCESS_KEY", "--s3-access-key": "AWS_ACCESS_KEY_ID",
                "--s3-session-token": "AWS_SESSION_TOKEN"}


class _RefuseSecretFlag(argparse.Action):
    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs="?", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        flag = next(f for f in self.option_strings if f in SECRET_FLAGS)
        parser.error(
            f"{flag} is not accepted: a secret on the command line is visible in `ps`, shell history and "
            f"Ray's job info. Set {SECRET_FLAGS[flag]} in the environment (on Kubernetes: the "
            "soho-s3-credentials Secret) or use a credentials file (~/.aws/credentials, "
            "AWS_SHARED_CREDENTIALS_FILE, AWS_PROFILE).")


def refuse_secret_flags(parser: argparse.ArgumentParser | Any) -> None:
    """Make ``parser`` (or an argument group) fail with a clear message on any of :data:`SECRET_FLAGS`."""
    for flag in SECRET_FLAGS:
        parser.add_argument(flag, action=_RefuseSecretFlag)


def get_fs(url: str, storage_options: dict[str, Any] | None = None) -> tuple[AbstractFileSystem, str]:
    """(filesystem, path without protocol) for a URL or plain path."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, path.rstrip("/") if path not in ("/", "") else path


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *[p.strip("/") for p in parts]])


def atomic_write_bytes(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` appears only complete (temp name, then move)."""
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
    except BaseException:
        try:
            if fs.exists(tmp):
                fs.rm(tmp)
        except Exception:  # cleanup is best effort; the original error matters
            logger.warning("could not remove temporary file %s", tmp)
        raise


def write_json(fs: AbstractFileSystem, path: str, obj: Any) -> None:
    atomic_write_bytes(fs, path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def read_json(fs: AbstractFileSystem, path: str) -> Any:
    with fs.open(path, "rb") as f:
        return json.loads(f.read().decode("utf-8"))


_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}|\{([^{}]*,[^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """'a-{000..002}.tar' → ['a-000.tar', 'a-001.tar', 'a-002.tar']; also '{x,y}'. Nested: left to right."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    if m.group(1) is not None:
        lo, hi = m.group(1), m.group(2)
        width = len(lo) if lo.startswith("0") else 0
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        options = m.group(3).split(",")
    head, tail = pattern[: m.start()], pattern[m.end() :]
    return [s for opt in options for s in expand_braces(head + opt + tail)]
