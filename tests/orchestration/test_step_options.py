"""Training-step options (issue 18): --grad-checkpointing, --channels-last, --compile.

Checkpointing must not change a step: with a fixed seed the losses, every gradient and every buffer (BatchNorm
running statistics, the visual dictionary's codebook) equal the plain path, while the trunk's blocks and the
BERT layers really are recomputed. channels_last changes only the convolution kernels' summation order.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orchestration.pretrain.config import RunConfig, parse_run_config
from orchestration.runtime.config import OptimConfig, ScaleConfig
from orchestration.runtime.engine import apply_step_options, build_engine
from soho import SohoForPretraining, soho_tiny
from soho.encoder import trunk_segments
from tests.orchestration.conftest import REPO


def _batch() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(5)
    pv = torch.randn(2, 3, 96, 128, generator=g)
    pm = torch.ones(2, 96, 128, dtype=torch.bool)
    pm[1, 64:, :] = False  # a padded image
    ids = torch.randint(999, 30000, (2, 12), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    am = torch.ones_like(ids)
    am[1, 9:] = 0
    return pv, pm, ids, am


def _step(model: SohoForPretraining) -> tuple[list[float], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One forward/backward in training mode (dropout on) with fixed seeds: losses, grads, buffers after."""
    pv, pm, ids, am = _batch()
    model.train()
    torch.manual_seed(11)
    out = model(pv, pm, ids, am, generator=torch.Generator().manual_seed(12))
    out.loss.backward()
    losses = [t.item() for t in (out.loss, out.mlm_loss, out.mvm_loss, out.itm_loss)]
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return losses, grads, {n: b.clone() for n, b in model.named_buffers()}


@pytest.fixture(scope="module")
def plain() -> tuple[SohoForPretraining, tuple]:
    torch.manual_seed(0)
    model = SohoForPretraining(soho_tiny())  # dropout 0.1, BatchNorm trunk, VD with EMA update
    fresh = copy.deepcopy(model)
    return fresh, _step(model)


def test_grad_checkpointing_equals_plain_step_and_recomputes(plain: tuple) -> None:
    fresh, (losses, grads, buffers) = plain
    model = copy.deepcopy(fresh)
    applied = apply_step_options(model, ScaleConfig(grad_checkpointing=True))
    assert applied == ["grad_checkpointing"]
    enc, fuser = model.soho.encoder, model.soho.transformer
    assert enc.grad_checkpointing and fuser.grad_checkpointing
    calls: dict[str, int] = {}

    def count(name: str) -> object:
        return lambda module, args: calls.__setitem__(name, calls.get(name, 0) + 1)

    # pre-hooks: a replay stops as soon as the tensors backward needs exist, before a module's forward hooks
    units = {"block": enc.segments[-1], "bert_layer": fuser.bert.encoder.layer[0].attention,
             "vd": model.soho.visual_dictionary}
    hooks = [m.register_forward_pre_hook(count(name)) for name, m in units.items()]
    ck_losses, ck_grads, ck_buffers = _step(model)
    for h in hooks:
        h.remove()
    # recomputed in backward: each checkpointed unit ran twice; the VD (outside every region) once
    assert calls == {"block": 2, "bert_layer": 2, "vd": 1}
    assert ck_losses == losses
    assert ck_grads.keys() == grads.keys() and len(grads) > 50
    for name in grads:
        assert torch.equal(ck_grads[name], grads[name]), name
    # BN running stats / num_batches_tracked updated once, VD codebook updated once: bit-equal buffers
    assert ck_buffers.keys() == buffers.keys()
    for name in buffers:
        assert torch.equal(ck_buffers[name], buffers[name]), name
    assert int(buffers["soho.encoder.trunk.1.num_batches_tracked"]) == 1


def test_checkpointing_without_bn_guard_would_double_the_bn_update(plain: tuple) -> None:
    """The guard is load-bearing: a plain recompute applies BatchNorm's momentum a second time."""
    fresh, (_, _, buffers) = plain
    model = copy.deepcopy(fresh)
    model.soho.encoder.set_grad_checkpointing(True)
    stem = model.soho.encoder.segments[0]
    unguarded = torch.utils.checkpoint.checkpoint(stem, _batch()[0], use_reentrant=False)
    unguarded.sum().backward()
    assert int(stem[1].num_batches_tracked) == 2  # forward + replay
    assert int(buffers["soho.encoder.trunk.1.num_batches_tracked"]) == 1  # the plain step


def test_channels_last_matches_plain_step(plain: tuple) -> None:
    fresh, (losses, grads, buffers) = plain
    model = copy.deepcopy(fresh)
    apply_step_options(model, ScaleConfig(channels_last=True))
    conv = model.soho.encoder.trunk[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    cl_losses, cl_grads, cl_buffers = _step(model)
    # the same maths, other kernels (NHWC summation order): equal to float32 rounding
    assert cl_losses == pytest.approx(losses, rel=1e-5, abs=1e-5)
    for name in grads:
        assert torch.allclose(cl_grads[name], grads[name], rtol=1e-3, atol=1e-4), name
    for name in buffers:
        assert torch.allclose(cl_buffers[name].float(), buffers[name].float(), rtol=1e-4, atol=1e-5), name
    # state-dict keys unchanged (segments are not registered), and an export saves (contiguous copies)
    assert list(model.state_dict()) == list(fresh.state_dict())


def test_trunk_segments_of_a_resnet_are_stem_and_blocks() -> None:
    from torchvision.models import resnet18

    net = resnet18(weights=None)
    trunk = torch.nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3,
                                net.layer4)
    segs = trunk_segments(trunk)
    assert len(segs) == 1 + 8  # stem + 2 BasicBlocks in each of 4 stages
    assert [type(m).__name__ for m in segs[0]] == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"]
    assert segs[1] is net.layer1[0] and segs[-1] is net.layer4[1]
    with pytest.raises(ValueError, match="Linear after the residual blocks"):
        trunk_segments(torch.nn.Sequential(*trunk, torch.nn.Linear(2, 2)))


def test_flags_reach_the_scale_section_and_the_engine(tmp_path: Path) -> None:
    cfg = parse_run_config(["--grad-checkpointing", "--channels-last"])
    assert (cfg.scale.grad_checkpointing, cfg.scale.channels_last, cfg.scale.compile) == (True, True, False)
    assert RunConfig.of().scale.grad_checkpointing is False  # defaults: off (docs/RESULTS.md)
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("compile: true\ngrad_checkpointing: true\n")
    cfg = parse_run_config(["--config", str(yaml_file), "--no-grad-checkpointing"])
    assert (cfg.scale.grad_checkpointing, cfg.scale.compile) == (False, True)
    assert cfg.to_dict()["compile"] is True and cfg.to_dict()["channels_last"] is False
    torch.manual_seed(0)
    built = build_engine(SohoForPretraining(soho_tiny()), OptimConfig(),
                         ScaleConfig(grad_checkpointing=True, channels_last=True), 1, kind="torch")
    assert built.module.soho.encoder.grad_checkpointing and built.module.soho.encoder.channels_last
    assert built.module.soho.transformer.bert.encoder.layer[1].gradient_checkpointing is True


def test_channels_last_under_deepspeed_keeps_weights_contiguous() -> None:
    """deepspeed.initialize views each parameter as bytes to broadcast it: NHWC weights cannot be."""
    torch.manual_seed(0)
    model = SohoForPretraining(soho_tiny())
    apply_step_options(model, ScaleConfig(channels_last=True), kind="deepspeed")
    assert model.soho.encoder.channels_last
    assert all(p.is_contiguous() for p in model.parameters())
    model.soho.encoder.trunk[0].weight.data.view(torch.uint8)  # what DeepSpeed's broadcast does


def test_options_on_a_model_without_soho_parts_fail_clearly() -> None:
    with pytest.raises(ValueError, match="Linear holds no SOHO GridEncoder or CrossModalEncoder"):
        apply_step_options(torch.nn.Linear(2, 2), ScaleConfig(channels_last=True))
    assert apply_step_options(torch.nn.Linear(2, 2), ScaleConfig()) == []


def test_compile_without_a_cxx_compiler_fails_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("CXX", raising=False)
    fix = "--compile on CPU needs a C\\+\\+ compiler.*apt-get install g\\+\\+"
    with pytest.raises(RuntimeError, match=fix):
        apply_step_options(SohoForPretraining(soho_tiny()), ScaleConfig(compile=True))


COMPILE_SCRIPT = r"""
import json, os, sys
import torch, torch.distributed as dist
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
import orchestration.runtime.engine as E
from orchestration.runtime.config import OptimConfig, ScaleConfig
from soho import SohoForPretraining, soho_tiny
from tests.orchestration.fixed_steps import train_steps
E.COMPILE_BACKEND = sys.argv[2]
result = {}
for name, opts in (("eager", {}), ("compiled", {"compile": True, "grad_checkpointing": True})):
    torch.manual_seed(0)
    built = E.build_engine(SohoForPretraining(soho_tiny()), OptimConfig(),
                           ScaleConfig(zero_stage=2, micro_batch_size=2, **opts), 1)
    assert built.kind == "deepspeed" and built.engine.zero_optimization_stage() == 2
    losses = train_steps(built.engine)
    m = built.module
    result[name] = {"losses": losses, "keys": list(m.state_dict()),
                    "trunk_w": m.soho.encoder.trunk[0].weight.detach().double().sum().item(),
                    "compiled": m.soho.transformer._compiled_call_impl is not None}
print("RESULT " + json.dumps(result))
"""


@pytest.mark.slow
@pytest.mark.integration
def test_compile_under_deepspeed_zero2_trains_like_eager(tmp_path: Path) -> None:
    """--compile (+ checkpointing) through build_engine into DeepSpeed ZeRO-2 on CPU, 3 optimizer steps:
    same losses and updated weights as eager, same state-dict keys. Backend aot_eager: Dynamo's capture and
    AOTAutograd's joint graph as with Inductor, without its C++ build (minutes per graph on a busy 2-core
    machine; docs/RESULTS.md) — and with eager's RNG, so the dropout masks match and losses compare."""
    proc = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT, str(tmp_path / "pg"), "aot_eager"],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "DS_ACCELERATOR": "cpu", "LOCAL_RANK": "0", "RANK": "0",
                               "WORLD_SIZE": "1"}, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    eager, compiled = res["eager"], res["compiled"]
    assert compiled["compiled"] and not eager["compiled"]
    assert compiled["keys"] == eager["keys"]  # in-place compile: no _orig_mod. prefix in checkpoints
    assert compiled["losses"] == pytest.approx(eager["losses"], rel=1e-4)
    assert eager["losses"][0] != eager["losses"][2]  # the optimizer stepped
    assert compiled["trunk_w"] == pytest.approx(eager["trunk_w"], rel=1e-5)
