"""Save/load of every SOHO model class: one writer and one reader (``save_model`` / ``read_model``).

A saved directory holds two files, the format every version has written:

- ``config.json``: ``{"soho_class": <class tag>, "config": SohoConfig.to_dict(), ...}`` written with
  ``indent=2, sort_keys=True``. The backbone classes add ``"soho_format_version": 1``; task models add
  ``"task"`` and ``"task_args"`` (the keyword arguments that rebuild the head).
- ``model.safetensors``: the fp32 state dict (other dtypes as they are), metadata
  ``{"format": "pt", "soho_class": <class tag>}``. Read back with safetensors (no pickle).

Loading never touches a hub or a pretrained file: the model is rebuilt from the stored config with
``load_pretrained=False`` and the tensors are loaded strictly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from soho.config import SohoConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1
"""``soho_format_version`` of the backbone classes' config.json (task models never wrote one)."""


def save_model(
    directory: str | Path, module: nn.Module, config: SohoConfig, soho_class: str, **meta: Any
) -> Path:
    """Write ``module``'s state dict and ``config`` (+ the extra JSON keys ``meta``) under ``directory``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, t in module.state_dict().items():
        t = t.detach().to("cpu")
        tensors[name] = (t.float() if t.is_floating_point() else t).contiguous()
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt", "soho_class": soho_class})
    doc = {"soho_class": soho_class, "config": config.to_dict(), **meta}
    (out / CONFIG_NAME).write_text(json.dumps(doc, indent=2, sort_keys=True))
    return out


def read_model(directory: str | Path) -> tuple[SohoConfig, dict[str, Any], dict[str, torch.Tensor]]:
    """(config, the whole config.json document, state dict) of a directory written by ``save_model``."""
    d = Path(directory)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (d / name).is_file():
            raise FileNotFoundError(f"{directory}: missing {name} (not a saved SOHO model directory)")
    meta = json.loads((d / CONFIG_NAME).read_text())
    if not isinstance(meta, dict) or "config" not in meta:
        raise ValueError(f"{d / CONFIG_NAME}: not a SOHO config (no 'config' key)")
    return SohoConfig.from_dict(meta["config"]), meta, load_file(str(d / WEIGHTS_NAME))


def sub_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``state`` under ``prefix`` (e.g. "soho."), with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
