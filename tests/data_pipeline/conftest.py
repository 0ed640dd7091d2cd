"""Fixtures for the data-pipeline tests (tiny images, few samples: the whole folder runs in well under 3
min)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # helpers.py beside this file

from helpers import free_port  # noqa: E402


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Small synthetic dataset shared by the loader tests (8 shards of 12 pairs)."""
    from data_pipeline.synth import SynthConfig, make_synthetic

    out = tmp_path_factory.mktemp("synth")
    cfg = SynthConfig(samples_per_shard=12, vqa_images=(4, 2), nlvr2_pairs=(4, 2), snli_ve_images=(3, 2),
                      retrieval_images=(4, 2, 3))
    make_synthetic(str(out), num=96, seed=3, heldout=10, image_size=48, config=cfg)
    return out


@pytest.fixture(scope="module")
def moto_s3():
    """moto's S3 server on a free loopback port; yields fsspec storage options pointing at it."""
    from moto.server import ThreadedMotoServer

    old = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1")
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        yield {"client_kwargs": {"endpoint_url": endpoint}, "key": "testing", "secret": "testing"}, endpoint
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
