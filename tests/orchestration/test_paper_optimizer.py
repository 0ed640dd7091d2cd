"""The paper's optimiser: HybridSGDAdamW (SGD+momentum trunk, AdamW rest) against torch's own SGD/AdamW, its
state_dict round trip, the step lr schedule, DeepSpeed ZeRO 0/1/2 with it as client optimizer, and a real CLI
run with --backbone-optimizer sgd --lr-schedule step that resumes from its checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from orchestration.pretrain.config import RunConfig
from orchestration.runtime.checkpoint import read_history
from orchestration.runtime.optim import HybridSGDAdamW
from orchestration.runtime.schedule import apply_lr, lr_factor, param_groups
from tests.orchestration.conftest import FAST_FLAGS, REPO, last_json, run_cli

SGD_HP = {"lr": 1e-2, "momentum": 0.9, "weight_decay": 1e-4}
ADAMW_HP = {"lr": 1e-3, "betas": (0.9, 0.98), "eps": 1e-8, "weight_decay": 0.01}


def _two_models(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    a = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    b = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    b.load_state_dict(a.state_dict())
    return a, b


def _hybrid(model: nn.Module) -> HybridSGDAdamW:
    return HybridSGDAdamW([
        {"params": list(model[0].parameters()), "optimizer": "sgd", **SGD_HP},
        {"params": list(model[2].parameters()), "optimizer": "adamw", **ADAMW_HP},
    ])


def _loss(model: nn.Module, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(8, 5, generator=g), torch.randn(8, 3, generator=g)
    return ((model(x) - y) ** 2).mean()


def test_hybrid_updates_equal_torch_sgd_and_adamw() -> None:
    ours, ref = _two_models()
    opt = _hybrid(ours)
    ref_sgd = torch.optim.SGD(ref[0].parameters(), **SGD_HP)
    ref_adamw = torch.optim.AdamW(ref[2].parameters(), **ADAMW_HP)
    init = [p.detach().clone() for p in ours.parameters()]
    for step in range(3):
        opt.zero_grad()
        ref_sgd.zero_grad()
        ref_adamw.zero_grad()
        _loss(ours, step).backward()
        _loss(ref, step).backward()
        opt.step()
        ref_sgd.step()
        ref_adamw.step()
        for (name, p), q in zip(ours.named_parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-7, msg=f"step {step + 1}: {name}")
    # the updates are real (not both no-ops) and the state is the kind each group needs
    assert all(not torch.equal(p, q) for p, q in zip(ours.parameters(), init, strict=True))
    for p in ours[0].parameters():
        torch.testing.assert_close(opt.state[p]["momentum_buffer"],
                                   ref_sgd.state[p_ref(ref, ours, p)]["momentum_buffer"])
        assert opt.state[p]["exp_avg"] is None
    for p in ours[2].parameters():
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"],
                                   ref_adamw.state[p_ref(ref, ours, p)]["exp_avg_sq"])
        assert opt.state[p]["momentum_buffer"] is None and float(opt.state[p]["step"]) == 3.0


def p_ref(ref: nn.Module, ours: nn.Module, p: torch.Tensor) -> torch.Tensor:
    """The reference model's parameter at the same position as ``p`` in ours."""
    idx = [i for i, q in enumerate(ours.parameters()) if q is p][0]
    return list(ref.parameters())[idx]


def test_state_dict_round_trip_continues_exactly(tmp_path: Path) -> None:
    straight, resumed = _two_models(seed=1)
    opt_a = _hybrid(straight)
    for step in range(5):
        opt_a.zero_grad()
        _loss(straight, step).backward()
        opt_a.step()

    opt_b = _hybrid(resumed)
    for step in range(2):
        opt_b.zero_grad()
        _loss(resumed, step).backward()
        opt_b.step()
    torch.save({"model": resumed.state_dict(), "opt": opt_b.state_dict()}, tmp_path / "ckpt.pt")

    _, fresh = _two_models(seed=2)  # different init: everything must come from the checkpoint
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    fresh.load_state_dict(ckpt["model"])
    opt_c = HybridSGDAdamW([{"params": list(fresh[0].parameters()), "optimizer": "adamw", "lr": 5.0},
                            {"params": list(fresh[2].parameters()), "optimizer": "adamw", "lr": 5.0}])
    opt_c.load_state_dict(ckpt["opt"])  # groups' kind and hyperparameters come back too
    assert [g["optimizer"] for g in opt_c.param_groups] == ["sgd", "adamw"]
    assert opt_c.param_groups[0]["momentum"] == 0.9 and opt_c.param_groups[0]["lr"] == 1e-2
    for step in range(2, 5):
        opt_c.zero_grad()
        _loss(fresh, step).backward()
        opt_c.step()
    for (name, p), q in zip(fresh.named_parameters(), straight.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def test_lr_factor_step_exact_values() -> None:
    cfg = RunConfig.of(max_steps=100, warmup_steps=10, lr_schedule="step", lr_milestones=[40, 70],
                       lr_step_gamma=0.1)
    assert lr_factor(cfg.optim, 0) == pytest.approx(0.1)
    assert lr_factor(cfg.optim, 8) == pytest.approx(0.9)
    # warm-up ends at step 9 (0-based)
    assert lr_factor(cfg.optim, 9) == 1.0 and lr_factor(cfg.optim, 10) == 1.0
    assert lr_factor(cfg.optim, 39) == 1.0
    assert lr_factor(cfg.optim, 40) == pytest.approx(0.1) and lr_factor(cfg.optim, 69) == pytest.approx(0.1)
    assert lr_factor(cfg.optim, 70) == pytest.approx(0.01) and lr_factor(cfg.optim, 99) == pytest.approx(0.01)
    early = cfg.replace(lr_milestones=[5])  # a milestone inside the warm-up scales the ramp
    assert (lr_factor(early.optim, 4) == pytest.approx(0.5)
            and lr_factor(early.optim, 5) == pytest.approx(0.06))
    assert lr_factor(early.optim, 50) == pytest.approx(0.1)


def test_param_groups_and_apply_lr_for_the_paper_recipe() -> None:
    from soho import SohoForPretraining, soho_tiny

    cfg = RunConfig.of(lr=1e-4, backbone_lr=1e-2, weight_decay=0.01, backbone_optimizer="sgd",
                       backbone_momentum=0.9, backbone_weight_decay=1e-4, warmup_steps=2, lr_schedule="step",
                       lr_milestones=[3, 5])
    groups, specs = param_groups(SohoForPretraining(soho_tiny()), cfg.optim)
    kinds = {(s.name, s.decay): (g["optimizer"], g["weight_decay"], g.get("momentum"))
             for s, g in zip(specs, groups, strict=True)}
    assert kinds == {("backbone", True): ("sgd", 1e-4, 0.9), ("backbone", False): ("sgd", 0.0, 0.9),
                     ("rest", True): ("adamw", 0.01, None), ("rest", False): ("adamw", 0.0, None)}
    opt = HybridSGDAdamW(groups, lr=cfg.optim.lr)
    expected = {0: 0.5, 1: 1.0, 2: 1.0, 3: 0.1, 4: 0.1, 5: 0.01}
    for step, factor in expected.items():
        rest = apply_lr(opt, specs, cfg.optim, step, frozen=False)
        assert rest == pytest.approx(1e-4 * factor)
        for s, g in zip(specs, opt.param_groups, strict=True):
            assert g["lr"] == pytest.approx((1e-2 if s.name == "backbone" else 1e-4) * factor)


@pytest.mark.parametrize(("changes", "field"), [
    ({"backbone_optimizer": "lamb"}, "backbone_optimizer"),
    ({"backbone_momentum": 1.0}, "backbone_momentum"),
    ({"backbone_weight_decay": -1.0}, "backbone_weight_decay"),
    ({"lr_schedule": "step", "lr_milestones": [5, 3]}, "lr_milestones"),
    ({"lr_schedule": "step", "lr_milestones": [0, 3]}, "lr_milestones"),
    ({"lr_schedule": "step", "lr_milestones": []}, "lr_milestones"),
    ({"lr_schedule": "cosine", "lr_milestones": [3]}, "lr_milestones"),
    ({"lr_schedule": "step", "lr_milestones": [3], "lr_step_gamma": 0.0}, "lr_step_gamma"),
])
def test_bad_optimizer_options_name_the_field(changes: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        RunConfig.of(**changes)
    with pytest.raises(ValueError, match=field):
        RunConfig.from_dict({k.replace("_", "-"): v for k, v in changes.items()})


DS_SCRIPT = textwrap.dedent(
    """
    import copy, json, os, sys, tempfile, torch
    from torch import nn
    import deepspeed, deepspeed.ops
    from orchestration.runtime.optim import HybridSGDAdamW
    from orchestration.runtime.distributed import ensure_process_group
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    ensure_process_group(False)

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 4))

    def opt_for(m):
        return HybridSGDAdamW([
            {"params": list(m[0].parameters()), "optimizer": "sgd", "lr": 1e-2, "momentum": 0.9,
             "weight_decay": 1e-4},
            {"params": list(m[2].parameters()), "optimizer": "adamw", "lr": 1e-3, "betas": (0.9, 0.98),
             "weight_decay": 0.01}])

    def loss(m, step):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(4, 6, generator=g), torch.randn(4, 4, generator=g)
        return ((m(x) - y) ** 2).mean()

    def engine(stage):
        m = model()
        cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "train_batch_size": 4,
               "gradient_clipping": 0.0, "zero_optimization": {"stage": stage},
               "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
        e, _, _, _ = deepspeed.initialize(model=m, optimizer=opt_for(m), config=cfg, dist_init_required=False)
        return e

    def train(e, steps):
        for s in steps:
            l = loss(e, s)
            e.backward(l)
            e.step()

    ref = model(); ref_opt = opt_for(ref)
    for s in range(4):
        ref_opt.zero_grad(); loss(ref, s).backward(); ref_opt.step()
    out = {}
    for stage in (0, 1, 2):
        e = engine(stage)
        train(e, range(2))
        kinds = [g["optimizer"] for g in e.optimizer.param_groups]
        d = tempfile.mkdtemp()
        e.save_checkpoint(d, tag="t")
        train(e, range(2, 4))
        straight = {n: p.detach().clone() for n, p in e.module.named_parameters()}
        e2 = engine(stage)
        e2.load_checkpoint(d, tag="t", load_optimizer_states=True, load_lr_scheduler_states=False)
        kinds_loaded = [g["optimizer"] for g in e2.optimizer.param_groups]
        train(e2, range(2, 4))
        out[stage] = {
            "kinds": kinds, "kinds_loaded": kinds_loaded,
            "flat": [len(g["params"]) for g in e.optimizer.param_groups],
            "max_diff_vs_plain": max((straight[n] - p).abs().max().item()
                                     for n, p in ref.named_parameters()),
            "moved": max((straight[n] - p).abs().max().item() for n, p in model().named_parameters()),
            "max_diff_resumed": max((straight[n] - p).abs().max().item()
                                    for n, p in e2.module.named_parameters()),
        }
    print("RESULT " + json.dumps(out))
    """
)


@pytest.mark.integration
def test_deepspeed_zero_0_1_2_client_optimizer_and_checkpoint(tmp_path: Path) -> None:
    """Real DeepSpeed on CPU (1 gloo rank): the per-group kind survives ZeRO's flattening, the updates equal
    the optimizer without DeepSpeed, and save/load_checkpoint continues exactly."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", DS_SCRIPT], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    for stage in ("0", "1", "2"):
        r = res[stage]
        assert r["kinds"] == ["sgd", "adamw"] and r["kinds_loaded"] == ["sgd", "adamw"], (stage, r)
        if stage != "0":
            assert r["flat"] == [1, 1], r  # ZeRO gave each group one flat fp32 partition
        assert r["moved"] > 1e-3, r
        assert r["max_diff_vs_plain"] < 1e-6, (stage, r)
        assert r["max_diff_resumed"] == 0.0, (stage, r)


@pytest.mark.integration
@pytest.mark.slow
def test_cli_run_with_paper_optimizer_steps_lr_and_resumes(tmp_path: Path, synth_manifest: str) -> None:
    args = [*FAST_FLAGS, "--launcher", "local", "--data", synth_manifest, "--storage-path", str(tmp_path),
            "--run-name", "paper-opt", "--zero-stage", "2", "--metrics-port", "-1", "--checkpoint-every", "3",
            "--backbone-optimizer", "sgd", "--backbone-lr", "1e-2", "--backbone-weight-decay", "1e-4",
            "--lr", "1e-4", "--grad-clip", "10", "--lr-schedule", "step", "--lr-milestones", "3,5"]
    first = run_cli([*args, "--max-steps", "6"])
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert last_json(first.stdout)["steps"] == 6
    ckroot = tmp_path / "paper-opt" / "checkpoints"
    state = json.loads((ckroot / "checkpoint_step_00000006" / "train_state.json").read_text())
    hist = read_history(str(tmp_path), "paper-opt", upto=6)
    lrs = {r["step"]: r["lr"] for r in hist}
    # history step s used lr_factor(s - 1): warm-up 2 steps, x0.1 from optimizer step 3, x0.01 from step 5
    expected = {1: 0.5, 2: 1.0, 3: 1.0, 4: 0.1, 5: 0.1, 6: 0.01}
    for s, f in expected.items():
        assert lrs[s] == pytest.approx(1e-4 * f), (s, lrs)
    assert lrs[4] / lrs[3] == pytest.approx(0.1) and lrs[6] / lrs[5] == pytest.approx(0.1)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in hist)
    assert state["config"]["backbone_optimizer"] == "sgd" and state["config"]["lr_milestones"] == [3, 5]
    # DeepSpeed's ZeRO-2 optimizer file keeps the hybrid optimizer's per-group kind (what a resume loads)
    optim_file = next((ckroot / "checkpoint_step_00000006" / "ds").rglob("*optim_states.pt"))
    saved = torch.load(optim_file, map_location="cpu", weights_only=False)
    base = saved["optimizer_state_dict"]["base_optimizer_state"]
    assert [g["optimizer"] for g in base["param_groups"]] == ["sgd", "sgd", "adamw", "adamw"]
    assert [g["weight_decay"] for g in base["param_groups"]] == [1e-4, 0.0, 0.01, 0.0]
    assert all(s["momentum_buffer"] is not None for s in list(base["state"].values())[:2])

    second = run_cli([*args, "--max-steps", "8"])  # same run: resumes from the committed step-6 checkpoint
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    summary = last_json(second.stdout)
    assert summary["steps"] == 8 and summary["resumes"] == [{"from_step": 6, "first_step": 7}]
    hist = read_history(str(tmp_path), "paper-opt", upto=8)
    assert [r["step"] for r in hist] == list(range(1, 9))
    assert [r["lr"] for r in hist[6:]] == pytest.approx([1e-6, 1e-6])
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in hist)
