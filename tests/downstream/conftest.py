"""Small synthetic downstream files shared by the downstream tests (written once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from data_pipeline.synth import SynthConfig, make_synthetic

    out: Path = tmp_path_factory.mktemp("downstream-synth")
    cfg = SynthConfig(vqa_images=(48, 24), vqa_questions_per_image=4, nlvr2_pairs=(32, 16),
                      snli_ve_images=(16, 8), retrieval_images=(48, 8, 16))  # fmt: skip
    return make_synthetic(str(out), num=256, seed=0, heldout=0, image_size=64, config=cfg)
