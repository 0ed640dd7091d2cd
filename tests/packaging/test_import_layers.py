"""The package layering of docs/DESIGN.md, enforced on the source: who may import whom, imports at the top of
modules, and no import cycles. A checker over the AST (no imports executed), tested on the repository and on a
small tree with planted violations (so it can fail)."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("soho", "data_pipeline", "orchestration", "configcli")
# soho's command-line shims: the only soho modules that reach into orchestration (see docs/DESIGN.md)
SOHO_SHIMS = {"soho.train": "orchestration.pretrain.cli", "soho.finetune": "orchestration.finetune.launch",
              "soho.evaluate": "orchestration.finetune.launch"}
SOHO_MAY_IMPORT = {"torch", "torchvision", "transformers", "safetensors", "numpy", "PIL", "huggingface_hub",
                   "soho_minilm", "soho"}
TRAINING_STACK = {"ray", "deepspeed", "fsspec", "s3fs", "webdataset", "pyarrow", "prometheus_client"}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, e.g. orchestration.pretrain.worker
    target: str  # what it imports, absolute, e.g. orchestration.runtime.engine
    line: int
    top: bool  # at module level (not inside a function or class body)


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def scan(root: Path) -> list[Import]:
    """Every import statement of the project's packages under ``root``."""
    out: list[Import] = []
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")) if (root / pkg).is_dir() else []:
            mod = module_name(root, path)
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            out.extend(_imports(tree, mod, path.name == "__init__.py"))
    return out


def _imports(tree: ast.Module, mod: str, is_package: bool) -> list[Import]:
    found: list[Import] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue  # annotations only: never executed
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef,
                                                   ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend(Import(mod, a.name, child.lineno, top) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative import: resolve against this module's package
                    package = mod.split(".") if is_package else mod.split(".")[:-1]
                    package = package[: len(package) - (child.level - 1)]
                    base = ".".join([*package, base] if base else package)
                found.extend(Import(mod, f"{base}.{a.name}" if a.name != "*" else base, child.lineno, top)
                             for a in child.names)
            visit(child, inner)

    visit(tree, True)
    return found


def _within(target: str, prefix: str) -> bool:
    return target == prefix or target.startswith(prefix + ".")


def violations(imports: list[Import]) -> list[str]:
    """Every broken rule, as 'module:line imports target: why'."""
    bad: list[str] = []

    def flag(i: Import, why: str) -> None:
        bad.append(f"{i.module}:{i.line} imports {i.target}: {why}")

    for i in imports:
        top_pkg = i.target.split(".")[0]
        own = top_pkg in PACKAGES
        if i.module.startswith("soho"):
            if i.module in SOHO_SHIMS:
                if own and not (_within(i.target, "soho") or _within(i.target, SOHO_SHIMS[i.module])):
                    flag(i, f"a soho CLI shim may only forward to {SOHO_SHIMS[i.module]}")
            elif own and top_pkg != "soho":
                flag(i, "soho/ is the pure model: it imports no other package of the project")
            elif top_pkg in TRAINING_STACK:
                flag(i, "soho/ imports no training-stack package (ray, deepspeed, storage, metrics)")
        elif i.module.startswith("data_pipeline"):
            if top_pkg in ("soho", "orchestration", "ray", "deepspeed"):
                flag(i, "data_pipeline/ never imports soho, orchestration, ray or deepspeed")
        elif i.module.startswith("configcli"):
            if own and top_pkg != "configcli":
                flag(i, "configcli imports no package of the project")
        elif i.module.startswith("orchestration.runtime"):
            if _within(i.target, "orchestration.pretrain") or _within(i.target, "orchestration.finetune"):
                flag(i, "runtime/ is shared by both jobs and imports neither")
        elif i.module.startswith("orchestration.pretrain"):
            if _within(i.target, "orchestration.finetune"):
                flag(i, "pre-training never imports fine-tuning")
        elif i.module.startswith("orchestration.finetune"):
            if _within(i.target, "orchestration.pretrain"):
                flag(i, "fine-tuning never imports pre-training")
        if own and not i.top:
            flag(i, "imports of the project's own packages belong at the top of the module")
    bad.extend(cycles(imports))
    return bad


def cycles(imports: list[Import]) -> list[str]:
    """Import cycles among the project's modules (module-level imports, edges to the nearest known module)."""
    modules = {i.module for i in imports}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for i in imports:
        if not i.top:
            continue
        target = i.target
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != i.module and not i.module.startswith(target + "."):
            graph[i.module].add(target)
    found: list[str] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                ring = stack[stack.index(n):]
                first = ring.index(min(ring))  # reported from its smallest module, however it was reached
                ring = ring[first:] + ring[:first]
                found.append("import cycle: " + " -> ".join([*ring, ring[0]]))
            elif n not in state:
                dfs(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            dfs(m)
    return found


def test_the_repository_keeps_its_layers() -> None:
    imports = scan(REPO)
    assert len({i.module for i in imports}) > 50  # the checker really read the packages
    assert violations(imports) == []


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_checker_fails_on_each_kind_of_violation(tmp_path: Path) -> None:
    _write(tmp_path, {
        "soho/__init__.py": "",
        "soho/model.py": "import torch\nfrom orchestration.runtime import engine\nimport deepspeed\n",
        "soho/train.py": "from orchestration.pretrain.cli import main\n",
        "data_pipeline/__init__.py": "",
        "data_pipeline/loader.py": "from soho import model\nimport configcli\n",
        "configcli/__init__.py": "import yaml\n",
        "orchestration/__init__.py": "",
        "orchestration/runtime/__init__.py": "",
        "orchestration/runtime/engine.py": "from orchestration.pretrain import worker\n",
        "orchestration/pretrain/__init__.py": "",
        "orchestration/pretrain/worker.py": "from orchestration.runtime import engine\n"
                                            "def f():\n    from orchestration.finetune import tasks\n",
        "orchestration/finetune/__init__.py": "",
        "orchestration/finetune/tasks.py": "from . import loop\n",
        "orchestration/finetune/loop.py": "from orchestration.finetune import tasks\n",
    })
    found = violations(scan(tmp_path))
    expected = [
        "soho.model:2 imports orchestration.runtime.engine: soho/ is the pure model",
        "soho.model:3 imports deepspeed: soho/ imports no training-stack package",
        "data_pipeline.loader:1 imports soho.model: data_pipeline/ never imports soho",
        "orchestration.runtime.engine:1 imports orchestration.pretrain.worker: runtime/ is shared by both "
        "jobs",
        "orchestration.pretrain.worker:3 imports orchestration.finetune.tasks: pre-training never imports",
        "orchestration.pretrain.worker:3 imports orchestration.finetune.tasks: imports of the project's own "
        "packages belong at the top",
        "import cycle: orchestration.finetune.loop -> orchestration.finetune.tasks -> "
        "orchestration.finetune.loop",
        "import cycle: orchestration.pretrain.worker -> orchestration.runtime.engine -> "
        "orchestration.pretrain.worker",
    ]
    for line in expected:
        assert any(v.startswith(line) for v in found), (line, found)
    assert len(found) == len(expected), found  # the shim and the allowed imports are not flagged
