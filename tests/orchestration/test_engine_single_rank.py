"""One-rank ZeRO-1/2 skips DeepSpeed's all-reduce of its gradient bucket
(:func:`orchestration.runtime.engine.skip_single_rank_reduction`): over one rank that reduction divides by 1.0
and all-reduces over itself, so skipping it must leave what is trained bit-for-bit the same. Real DeepSpeed on
CPU, the tiny preset, three optimizer steps with clipping, once with and once without the bypass."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestration.runtime.engine import skip_single_rank_reduction
from tests.orchestration.conftest import REPO

SCRIPT = r"""
import json, sys
import torch, torch.distributed as dist
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
import orchestration.runtime.engine as E
from orchestration.runtime.config import OptimConfig, ScaleConfig
from soho import SohoForPretraining, soho_tiny
from tests.orchestration.fixed_steps import train_steps
torch.set_num_threads(1)
runs = {}
for stage, bypass in ((2, True), (2, False), (1, True), (1, False)):
    torch.manual_seed(0)
    built = E.build_engine(SohoForPretraining(soho_tiny()), OptimConfig(grad_clip=0.5),
                           ScaleConfig(zero_stage=stage, micro_batch_size=2), 1)
    opt = built.engine.optimizer
    installed = "buffered_reduce_fallback" in vars(opt)
    if not bypass:
        del opt.buffered_reduce_fallback  # DeepSpeed's own method again
    losses = train_steps(built.engine)
    runs[(stage, bypass)] = (installed, losses, [p.detach().clone() for p in built.module.parameters()],
                             [t.detach().clone() for t in opt.single_partition_of_fp32_groups],
                             [b.clone() for b in built.module.buffers()],
                             float(built.engine.get_global_grad_norm()))
torch.manual_seed(0)
init = [p.detach() for p in SohoForPretraining(soho_tiny()).parameters()]
result = {}
for stage in (1, 2):
    on, off = runs[(stage, True)], runs[(stage, False)]
    result[stage] = {
        "installed": on[0], "losses_on": on[1], "losses_off": off[1], "norm_on": on[5], "norm_off": off[5],
        "params_equal": all(torch.equal(a, b) for a, b in zip(on[2], off[2], strict=True)),
        "masters_equal": all(torch.equal(a, b) for a, b in zip(on[3], off[3], strict=True)),
        "buffers_equal": all(torch.equal(a, b) for a, b in zip(on[4], off[4], strict=True)),
        "moved": max((a - b).abs().max().item() for a, b in zip(on[2], init, strict=True)),
    }
print("RESULT " + json.dumps(result))
"""


@pytest.mark.integration
def test_single_rank_zero12_without_the_identity_all_reduce_trains_bit_equal(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "pg")], capture_output=True,
                          text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "DS_ACCELERATOR": "cpu", "LOCAL_RANK": "0", "RANK": "0",
                               "WORLD_SIZE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    for stage in ("1", "2"):
        r = res[stage]
        assert r["installed"], (stage, r)  # build_engine put the bypass on the one-rank ZeRO optimizer
        assert r["losses_on"] == r["losses_off"], (stage, r)
        assert r["norm_on"] == r["norm_off"] and r["norm_on"] > 0.5, (stage, r)  # the clip really clipped
        assert r["params_equal"] and r["masters_equal"] and r["buffers_equal"], (stage, r)
        assert r["moved"] > 1e-4, (stage, r)  # three real optimizer steps happened
        assert r["losses_on"][0] != r["losses_on"][2], (stage, r)


def test_bypass_is_refused_where_it_is_not_deepspeeds_stage_1_2_optimizer() -> None:
    import torch

    plain = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    assert skip_single_rank_reduction(plain) is False
    assert "buffered_reduce_fallback" not in vars(plain)
