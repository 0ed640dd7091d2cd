"""Trainable visual encoder E (SOHO §3.1): whole image → ResNet trunk → 2×2 max-pool → 1×1 conv to c.

Images of different sizes share a batch by zero-padding at the bottom/right; ``pixel_mask`` marks real
pixels and is max-pooled down to the token grid, so a visual token is real when its receptive cell holds
any real pixel.

Input: the loader's uint8 RGB batch (0..255, see docs/DESIGN.md "The batch"), normalised here on the
model's device by :func:`normalize_pixels` — the one place that applies the ImageNet mean/std — or an
already normalised float batch, used as it is.

BatchNorm: regular ``nn.BatchNorm2d``. While the trunk is frozen (the paper's cold start) its BN layers
are also kept in eval mode, so running statistics do not drift while the weights are fixed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from torchvision.models import resnet as tv_resnet

from soho.config import RESNET_BACKBONES, GridEncoderConfig, normalise_weights, weights_is_path

logger = logging.getLogger(__name__)

_TRUNK_CHANNELS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_NORM_CONSTANTS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _norm_constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, bias) of shape (3, 1, 1), float32, on ``device``: x·scale + bias = (x/255 − mean)/std.
    Computed once on the CPU in float32 (the values the loader used when it normalised), then copied."""
    hit = _NORM_CONSTANTS.get(device)
    if hit is None:
        std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)
        scale = 1.0 / (255.0 * std)
        bias = -torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1) / std
        hit = _NORM_CONSTANTS[device] = (scale.to(device), bias.to(device))
    return hit


def normalize_pixels(
    pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """uint8 RGB (B, 3, H, W) → ImageNet-normalised ``dtype`` (B, 3, H, W), contiguous, on the input's device.

    Arithmetic in float32 (``v·scale`` then ``+ bias``, two rounded steps), then zero where ``pixel_mask``
    is False, then the cast to ``dtype``: bit for bit what the loader produced when it normalised on the
    CPU (padding exactly 0 after normalisation). Any memory format in (the loader's batch is stored
    channels-last); the result is contiguous, so the trunk computes exactly as on a contiguous float batch.
    """
    if pixel_values.dtype != torch.uint8:
        raise ValueError(f"normalize_pixels: pixel_values must be uint8 (0..255), got {pixel_values.dtype}")
    if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
        raise ValueError(f"normalize_pixels: pixel_values must be (B, 3, H, W), "
                         f"got {tuple(pixel_values.shape)}")
    scale, bias = _norm_constants(pixel_values.device)
    x = pixel_values.to(torch.float32, memory_format=torch.contiguous_format)
    x.mul_(scale).add_(bias)
    if pixel_mask is not None:
        if pixel_mask.shape != (x.shape[0], *x.shape[2:]):
            raise ValueError(f"normalize_pixels: pixel_mask must be (B, H, W)={(x.shape[0], *x.shape[2:])}, "
                             f"got {tuple(pixel_mask.shape)}")
        x.masked_fill_(~pixel_mask.to(torch.bool)[:, None], 0.0)
    return x if dtype == torch.float32 else x.to(dtype)


def _tiny_trunk(cfg: GridEncoderConfig) -> tuple[nn.Sequential, int]:
    """A narrow ResNet from torchvision's BasicBlock for CPU tests: stem (stride 4), then stages whose
    width doubles and resolution halves after the first."""
    w = cfg.tiny_width
    layers: list[nn.Module] = [
        nn.Conv2d(3, w, kernel_size=7, stride=2, padding=3, bias=False),
        nn.BatchNorm2d(w),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
    ]
    in_ch = w
    for i, n_blocks in enumerate(cfg.tiny_blocks):
        out_ch = w * 2**i
        stride = 1 if i == 0 else 2
        for b in range(n_blocks):
            s = stride if b == 0 else 1
            down = None
            if s != 1 or in_ch != out_ch:
                down = nn.Sequential(
                    nn.Conv2d(in_ch, out_ch, 1, stride=s, bias=False), nn.BatchNorm2d(out_ch)
                )
            layers.append(tv_resnet.BasicBlock(in_ch, out_ch, stride=s, downsample=down))
            in_ch = out_ch
    return nn.Sequential(*layers), in_ch


def _load_state_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(
            f"GridEncoderConfig.weights={str(path)!r}: expected a state dict, got {type(state).__name__}"
        )
    return state


class TrunkWeightsUnavailableError(RuntimeError):
    """torchvision's ImageNet weights are neither in the cache nor downloadable (an offline machine)."""


def offline() -> bool:
    """``SOHO_OFFLINE=1`` (or ``HF_HUB_OFFLINE=1``): never download weights, fail with the fix instead."""
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes")
               for k in ("SOHO_OFFLINE", "HF_HUB_OFFLINE"))


def torchvision_weights(backbone: str, name: str) -> Any:
    """The torchvision weights enum member ``name`` of ``backbone`` (e.g. ResNet101_Weights.IMAGENET1K_V1)."""
    from torchvision.models import get_model_weights

    enum = get_model_weights(getattr(tv_resnet, backbone))
    try:
        return enum[name]
    except KeyError:
        if weights_is_path(name):
            raise FileNotFoundError(f"GridEncoderConfig.weights={name!r}: no such state-dict file") from None
        raise ValueError(
            f"GridEncoderConfig.weights={name!r} is neither a file nor one of "
            f"{['imagenet', 'none', *(m.name for m in enum)]} for {backbone}"
        ) from None


def cache_file(weights: Any) -> Path:
    """Where torchvision's weights API keeps ``weights``: ``$TORCH_HOME/hub/checkpoints/<file of its url>``
    (``torch.hub.get_dir()``; TORCH_HOME defaults to ``~/.cache/torch``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def _unavailable(backbone: str, weights: Any, path: Path, why: str) -> TrunkWeightsUnavailableError:
    torch_home = os.environ.get("TORCH_HOME")
    home = f"TORCH_HOME={torch_home}" if torch_home else "TORCH_HOME unset: ~/.cache/torch"
    return TrunkWeightsUnavailableError(
        f"the ResNet trunk's ImageNet weights {type(weights).__name__}.{weights.name} are not in "
        f"torchvision's cache {path} ({home}; torchvision keeps them in $TORCH_HOME/hub/checkpoints/) "
        f"and {why}. Fixes: copy {path.name} (from {weights.url}) into $TORCH_HOME/hub/checkpoints/ on this "
        "machine (the k8s image does so at build time); or pass a local state dict: --backbone-weights "
        "/path/to/state_dict.pt; or start the trunk from random weights: --backbone-weights none (YAML: "
        "backbone_weights: none, as the CPU recipes do; not the paper's ImageNet start)"
    )


def ensure_trunk_weights(cfg: GridEncoderConfig, timeout_s: float = 120.0) -> Path | None:
    """The local file holding the trunk's initial weights, fetching torchvision's when needed: None for
    random init (and the tiny trunk); the file itself for a local state dict; torchvision's cache file for a
    weights enum name, downloaded through torchvision's weights API if missing. Raises
    :class:`TrunkWeightsUnavailableError` (naming TORCH_HOME and the random-init override) when the file is
    missing and the machine is offline (``SOHO_OFFLINE``/``HF_HUB_OFFLINE``) or the download fails."""
    name = normalise_weights(cfg.weights)
    if name is None or cfg.backbone == "tiny":
        return None
    if Path(name).is_file():
        return Path(name)
    weights = torchvision_weights(cfg.backbone, name)
    path = cache_file(weights)
    if path.is_file():
        return path
    if offline():
        raise _unavailable(cfg.backbone, weights, path, "downloads are off (SOHO_OFFLINE / HF_HUB_OFFLINE)")
    logger.info("downloading %s.%s to %s", type(weights).__name__, weights.name, path)
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)  # urllib inside torch.hub has no timeout of its own: fail, not hang
    try:
        weights.get_state_dict(progress=False, check_hash=True)  # torchvision's weights API fills the cache
    except (OSError, RuntimeError) as exc:  # URLError/HTTPError/timeouts: OSError; a bad hash: RuntimeError
        raise _unavailable(cfg.backbone, weights, path, f"downloading it failed ({exc})") from exc
    finally:
        socket.setdefaulttimeout(old_timeout)
    if not path.is_file():  # pragma: no cover - torch.hub writes exactly this path
        raise _unavailable(cfg.backbone, weights, path, "the download left no file there")
    return path


def _resnet_trunk(cfg: GridEncoderConfig) -> tuple[nn.Sequential, int]:
    builder = getattr(tv_resnet, cfg.backbone)
    path = ensure_trunk_weights(cfg)  # first: an offline machine fails before building anything
    net: tv_resnet.ResNet = builder(weights=None)
    if path is not None:
        # One path for every source (torchvision's cache file or the user's): weights_only=True, strict fit.
        state = _load_state_file(path)
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}  # classifier is not used
        missing, unexpected = net.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing or unexpected:
            raise ValueError(
                f"GridEncoderConfig.weights={cfg.weights!r} ({path}) does not fit torchvision "
                f"{cfg.backbone}: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        logger.info("loaded %s trunk weights (%s) from %s", cfg.backbone, cfg.weights, path)
    trunk = nn.Sequential(
        net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4
    )
    return trunk, _TRUNK_CHANNELS[cfg.backbone]


# --- training-step options: gradient checkpointing and channels_last of the trunk ---------------------------


def trunk_segments(trunk: nn.Sequential) -> list[nn.Module]:
    """The units that gradient checkpointing recomputes: the stem (every module before the first residual
    block: conv, BN, ReLU, max-pool) as one unit, then each residual block (torchvision's BasicBlock /
    Bottleneck; a ResNet stage ``layerN`` is split into its blocks). Only block boundaries stay in memory."""
    stem: list[nn.Module] = []
    blocks: list[nn.Module] = []
    for m in trunk:
        if isinstance(m, nn.Sequential):  # a torchvision stage
            blocks.extend(m)
        elif isinstance(m, (tv_resnet.BasicBlock, tv_resnet.Bottleneck)):
            blocks.append(m)
        elif blocks:
            raise ValueError(f"trunk_segments: {type(m).__name__} after the residual blocks is not supported")
        else:
            stem.append(m)
    return ([nn.Sequential(*stem)] if stem else []) + blocks


class _KeepNormStats:
    """Context of a checkpointed segment's *recomputation*: BatchNorm layers in training mode update their
    running statistics (and ``num_batches_tracked``) on every forward, so the replay in backward would apply
    the momentum twice. Their buffers are saved on entry and put back on exit; the replay's outputs are
    unchanged (training-mode BN normalises with the batch statistics, not the running ones)."""

    def __init__(self, module: nn.Module) -> None:
        bn = nn.modules.batchnorm._BatchNorm
        self.norms = [m for m in module.modules()
                      if isinstance(m, bn) and m.training and m.track_running_stats]
        self.saved: list[tuple[torch.Tensor, ...]] = []

    def __enter__(self) -> _KeepNormStats:
        self.saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
                      for m in self.norms]
        return self

    def __exit__(self, *exc: object) -> None:
        with torch.no_grad():
            for m, (mean, var, count) in zip(self.norms, self.saved, strict=True):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)
        self.saved = []


def checkpointed(segment: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``segment(x)`` under non-reentrant activation checkpointing: RNG state preserved for the replay and
    BatchNorm running statistics updated once (:class:`_KeepNormStats`), so values, gradients and buffers
    equal the plain path."""
    return torch.utils.checkpoint.checkpoint(
        segment, x, use_reentrant=False, preserve_rng_state=True,
        context_fn=lambda: (contextlib.nullcontext(), _KeepNormStats(segment)),
    )


def run_trunk(trunk: nn.Sequential, segments: list[nn.Module], x: torch.Tensor, grad_checkpointing: bool,
              channels_last: bool) -> torch.Tensor:
    """The trunk's forward with the step options: ``channels_last`` feeds the input in NHWC (the trunk's
    weights were converted by :meth:`GridEncoder.set_channels_last`); ``grad_checkpointing`` recomputes each
    of ``segments`` in backward instead of keeping its activations (only while training with gradients)."""
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if not (grad_checkpointing and trunk.training and torch.is_grad_enabled()):
        return trunk(x)
    for segment in segments:
        x = checkpointed(segment, x)
    return x


class GridEncoder(nn.Module):
    """``forward(pixel_values (B,3,H,W), pixel_mask (B,H,W) | None) -> (features (B,L,C), mask (B,L), (h,w))``
    with L = h·w tokens in row-major order. uint8 ``pixel_values`` are normalised first
    (:func:`normalize_pixels`, in the dtype of the encoder's weights); float ones are taken as normalised."""

    def __init__(self, config: GridEncoderConfig, load_pretrained: bool = True) -> None:
        super().__init__()
        config.validate()
        self.config = config
        if config.backbone == "tiny":
            self.trunk, channels = _tiny_trunk(config)
        else:
            assert config.backbone in RESNET_BACKBONES
            cfg = config if load_pretrained else GridEncoderConfig(**{**config.__dict__, "weights": None})
            self.trunk, channels = _resnet_trunk(cfg)
        self.pool = (
            nn.MaxPool2d(config.pool, config.pool, ceil_mode=True) if config.pool > 1 else nn.Identity()
        )
        self.proj = nn.Conv2d(channels, config.out_dim, kernel_size=1)
        self.backbone_trainable = True
        self.grad_checkpointing = False
        self.channels_last = False
        # A plain list, not registered submodules: the state-dict keys stay those of ``trunk``.
        self._segments: list[nn.Module] = trunk_segments(self.trunk)

    def set_grad_checkpointing(self, flag: bool = True) -> None:
        """Recompute the trunk's stem and each residual block in backward (activation memory of the trunk
        ≈ its block boundaries); same losses, gradients and BN statistics as without."""
        self.grad_checkpointing = bool(flag)

    def set_channels_last(self, flag: bool = True, weights: bool = True) -> None:
        """Trunk input (and with ``weights`` its weights) in ``torch.channels_last`` (NHWC), the layout
        oneDNN/cuDNN convolutions prefer; an NHWC input alone already makes them run NHWC. ``weights=False``
        for DeepSpeed, which views every parameter as bytes to broadcast it (NHWC strides cannot be) and
        re-flattens parameters into its own buffers anyway. ``False`` converts back to the default layout."""
        self.channels_last = bool(flag)
        if weights or not flag:
            self.trunk.to(memory_format=torch.channels_last if flag else torch.contiguous_format)

    @property
    def total_stride(self) -> int:
        return self.config.total_stride

    def set_backbone_trainable(self, flag: bool) -> None:
        """Cold start: freeze (False) / unfreeze (True) the ResNet trunk. Freezing sets requires_grad=False
        on trunk parameters and keeps trunk BatchNorm in eval mode; the 1×1 projection stays trainable."""
        self.backbone_trainable = bool(flag)
        for p in self.trunk.parameters():
            p.requires_grad_(self.backbone_trainable)
        self.train(self.training)

    def train(self, mode: bool = True) -> GridEncoder:
        super().train(mode)
        if not self.backbone_trainable:
            for m in self.trunk.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(
        self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must be (B, 3, H, W), got {tuple(pixel_values.shape)}")
        b, _, h_img, w_img = pixel_values.shape
        if pixel_mask is None:
            pixel_mask = torch.ones(b, h_img, w_img, dtype=torch.bool, device=pixel_values.device)
        elif pixel_mask.shape != (b, h_img, w_img):
            raise ValueError(
                f"pixel_mask must be (B, H, W)={(b, h_img, w_img)} like pixel_values, "
                f"got {tuple(pixel_mask.shape)}"
            )
        if pixel_values.dtype == torch.uint8:
            pixel_values = normalize_pixels(pixel_values, pixel_mask, dtype=self.proj.weight.dtype)
        elif not pixel_values.is_floating_point():
            raise ValueError(f"pixel_values must be uint8 (0..255) or normalised float, "
                             f"got {pixel_values.dtype}")
        x = self.proj(self.pool(self._trunk_forward(pixel_values)))  # (B, C, h, w)
        h, w = x.shape[-2:]
        s = self.total_stride
        # A token is real if its s×s cell holds any real pixel; ceil_mode matches the trunk's ceil sizes.
        m = F.max_pool2d(
            pixel_mask[:, None].to(x.dtype), kernel_size=s, stride=s, ceil_mode=True
        )  # (B,1,h',w')
        if m.shape[-2:] != (h, w):
            m = F.interpolate(m, size=(h, w), mode="nearest")
        mask = m[:, 0].flatten(1) > 0  # (B, h·w)
        features = x.flatten(2).transpose(1, 2)  # (B, C, h, w) → (B, h·w, C)
        return features, mask, (int(h), int(w))

    @property
    def segments(self) -> list[nn.Module]:
        """The trunk's checkpointing units (:func:`trunk_segments`), the trunk's own module objects."""
        return list(self._segments)

    def _trunk_forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return run_trunk(self.trunk, self._segments, pixel_values,
                         self.grad_checkpointing, self.channels_last)
