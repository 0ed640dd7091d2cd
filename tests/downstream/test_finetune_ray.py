"""``python -m soho.finetune --launcher ray``: the fine-tuning worker on Ray Train with 2 CPU workers (gloo)
and DeepSpeed, against the same model evaluated in this process afterwards."""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.ray]


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    import ray

    # address="local": a private Ray instance even if another one runs on this machine.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True,
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}})
    yield
    ray.shutdown()


def test_vqa_finetune_on_two_ray_workers(ray_local: None, synthetic: dict, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestration.finetune.launch import evaluate_main
    from orchestration.finetune.launch import main as finetune_main
    from soho.downstream.modeling import load_task_model

    # Relative paths, as a user types them: Ray workers run in another directory, the launcher must
    # resolve them against the driver's.
    monkeypatch.chdir(tmp_path)
    data = os.path.relpath(synthetic["downstream"], tmp_path)
    argv = ["--task", "vqa", "--launcher", "ray", "--num-workers", "2", "--engine", "deepspeed",
            "--data", data, "--output", "ft", "--image-size", "64", "--micro-batch-size", "8",
            "--max-steps", "12", "--lr", "1e-3", "--warmup-steps", "0", "--log-every", "4"]
    res = finetune_main(argv)

    assert res["world_size"] == 2 and res["steps"] == 12
    losses = [h["loss"] for h in res["history"]]
    first, last = statistics.mean(losses[:3]), statistics.mean(losses[-3:])
    print(f"vqa on 2 Ray workers: loss {first:.3f} -> {last:.3f}; eval {res['eval']}")
    assert len(losses) == 12 and last < first
    saved = json.loads((tmp_path / "ft" / "results.json").read_text())  # rank 0 wrote the results JSON
    assert saved["eval"] == res["eval"] and saved["world_size"] == 2
    assert res["eval"]["num_examples"] == synthetic["vqa_val_count"]
    assert 0.0 <= res["eval"]["vqa_accuracy"] <= 1.0
    assert load_task_model(tmp_path / "ft" / "model").task == "vqa"
    # The saved model, evaluated in this process, gives exactly the figure the Ray run reported.
    ev = evaluate_main(["--task", "vqa", "--checkpoint", "ft/model", "--data", data, "--output", "ev",
                        "--image-size", "64"])
    assert ev["eval"] == res["eval"]
