"""Where the ResNet trunk's initial weights come from: torchvision's ImageNet weights through its weights API
(read from $TORCH_HOME/hub/checkpoints), a local state-dict file, or random init; an offline machine gets an
error naming TORCH_HOME and the random-init override, before any worker starts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.models import resnet18

from orchestration.pretrain.config import RunConfig
from soho import GridEncoder, soho_base, soho_small
from soho.config import IMAGENET_WEIGHTS
from soho.encoder import TrunkWeightsUnavailableError, cache_file, torchvision_weights

# The trunk modules of torchvision's ResNet, in GridEncoder.trunk's order.
TRUNK = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


def _random_resnet18_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return resnet18(weights=None).state_dict()


def _assert_trunk_equals(encoder: GridEncoder, state: dict[str, torch.Tensor]) -> int:
    """Every trunk tensor (weights, BN statistics) equals the source state dict's; returns how many."""
    got = encoder.trunk.state_dict()
    # GridEncoder.trunk is nn.Sequential(conv1, bn1, relu, maxpool, layer1..4): index i = TRUNK[i]
    names = {f"{i}.{rest}": f"{TRUNK[i]}.{rest}" for i in range(len(TRUNK)) for rest in
             [k.split(".", 1)[1] for k in got if k.split(".", 1)[0] == str(i)]}
    assert set(names) == set(got)
    for ours, theirs in names.items():
        assert torch.equal(got[ours], state[theirs]), ours
    return len(names)


def test_presets_start_from_imagenet_and_tiny_cannot() -> None:
    assert soho_small().encoder.weights == soho_base().encoder.weights == IMAGENET_WEIGHTS == "IMAGENET1K_V1"
    w = torchvision_weights("resnet101", IMAGENET_WEIGHTS)
    assert type(w).__name__ == "ResNet101_Weights" and w.url.endswith("/resnet101-63fe2227.pth")
    cfg = RunConfig.of(preset="small")
    assert cfg.model_config().encoder.weights == "IMAGENET1K_V1"
    assert RunConfig.of(preset="small", backbone_weights="none").model_config().encoder.weights is None
    assert (RunConfig.of(preset="base", backbone_weights="imagenet").model_config().encoder.weights
            == "IMAGENET1K_V1")
    assert (RunConfig.of(preset="base", backbone_weights="IMAGENET1K_V2").model_config().encoder.weights
            == "IMAGENET1K_V2")
    with pytest.raises(ValueError, match="IMAGENET1K_V3.*IMAGENET1K_V1"):
        RunConfig.of(preset="base", backbone_weights="IMAGENET1K_V3")
    with pytest.raises(ValueError, match="tiny trunk is not a torchvision ResNet"):
        RunConfig.of(preset="tiny", backbone_weights="imagenet")


def test_local_state_dict_file_loads_through_the_run_config(tmp_path: Path) -> None:
    state = _random_resnet18_state(seed=11)
    path = tmp_path / "r18.pt"
    torch.save(state, path)
    cfg = RunConfig.of(preset="small", backbone_weights=str(path))
    enc = GridEncoder(cfg.model_config().encoder)
    assert _assert_trunk_equals(enc, state) > 100  # every conv/BN tensor of ResNet-18's trunk
    # a second seed gives other tensors: the equality above is not an accident of initialisation
    other = _random_resnet18_state(seed=12)
    assert not torch.equal(other["conv1.weight"], state["conv1.weight"])
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        GridEncoder(
            RunConfig.of(preset="small", backbone_weights=str(tmp_path / "missing.pt")).model_config().encoder
        )


def test_imagenet_weights_come_from_the_torch_home_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pre-seeded $TORCH_HOME/hub/checkpoints/<torchvision's file name> is what "imagenet" loads: the
    offline recipe of the README (a random state dict stands in for the real file, which cannot be
    downloaded here)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    monkeypatch.setenv("SOHO_OFFLINE", "1")
    path = cache_file(torchvision_weights("resnet18", IMAGENET_WEIGHTS))
    assert path == tmp_path / "th" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    path.parent.mkdir(parents=True)
    state = _random_resnet18_state(seed=21)
    torch.save(state, path)
    enc = GridEncoder(RunConfig.of(preset="small").model_config().encoder)
    _assert_trunk_equals(enc, state)


def test_offline_machine_gets_an_error_naming_torch_home_and_the_override(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    monkeypatch.setenv("SOHO_OFFLINE", "1")  # never reach the network from a test
    with pytest.raises(TrunkWeightsUnavailableError) as err:
        GridEncoder(soho_base().encoder)
    msg = str(err.value)
    for needle in ("ResNet101_Weights.IMAGENET1K_V1", f"TORCH_HOME={tmp_path / 'empty'}",
                   str(tmp_path / "empty" / "hub" / "checkpoints" / "resnet101-63fe2227.pth"),
                   "$TORCH_HOME/hub/checkpoints/", "--backbone-weights none", "backbone_weights: none",
                   "--backbone-weights /path/to/state_dict.pt"):
        assert needle in msg, (needle, msg)
    # load_pretrained=False (from_pretrained exports) never needs the file
    assert GridEncoder(soho_small().encoder, load_pretrained=False).proj.out_channels == 384


def test_cli_fails_before_training_when_the_weights_are_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from orchestration.pretrain.cli import main

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    monkeypatch.setenv("SOHO_OFFLINE", "1")
    storage = tmp_path / "runs"
    with pytest.raises(TrunkWeightsUnavailableError, match="--backbone-weights none"):
        main(["--preset", "small", "--launcher", "local", "--num-workers", "1",
              "--storage-path", str(storage), "--metrics-port", "-1", "--max-steps", "1"])
    assert not storage.exists()  # nothing started, nothing written


def test_the_image_bakes_in_the_weights_of_the_presets_it_runs() -> None:
    """k8s/Dockerfile fetches, at build time, the trunk of every preset that has ImageNet weights (through
    ensure_trunk_weights, the workers' own code path) and the base preset's BERT snapshot, then forbids
    downloads at run time."""
    import re

    from soho import get_preset

    dockerfile = (Path(__file__).resolve().parents[2] / "k8s" / "Dockerfile").read_text()
    assert "ensure_trunk_weights(p().encoder)" in dockerfile
    fetched = set(re.search(r"for p in \(([^)]*)\)", dockerfile).group(1).replace(" ", "").split(","))
    need = {f"soho_{n}" for n in ("tiny", "small", "base") if get_preset(n).encoder.weights is not None}
    assert fetched == need == {"soho_small", "soho_base"}
    assert f"snapshot_download('{get_preset('base').transformer.name_or_path}'" in dockerfile
    env = " ".join(re.findall(r"^ENV\s+((?:.*\\\n)*.*)$", dockerfile, re.M))
    for key in ("TORCH_HOME=", "HF_HOME=", "SOHO_OFFLINE=1", "HF_HUB_OFFLINE=1"):
        assert key in env, key
