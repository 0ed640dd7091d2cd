"""Console scripts (`soho-train`, `soho-shard`, …) beside `python -m`: pyproject's entry points resolve to
the CLI functions, each answers --help, and an installed `soho-train` runs as a program."""

from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (the dev extra installs tomli there)
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def _expected() -> dict[str, Callable]:
    import data_pipeline.cli
    import soho.evaluate
    import soho.finetune
    import soho.train

    return {"soho-train": soho.train.cli, "soho-finetune": soho.finetune.cli,
            "soho-evaluate": soho.evaluate.cli, "soho-data": data_pipeline.cli.main,
            "soho-shard": data_pipeline.cli.shard_main}


def test_entry_points_resolve_to_the_cli_functions() -> None:
    expected = _expected()
    assert set(SCRIPTS) == set(expected)
    for name, target in SCRIPTS.items():
        assert md.EntryPoint(name, target, "console_scripts").load() is expected[name], name


# (script, a flag its --help must list, the prog its usage line names)
HELP = [("soho-train", "--max-steps", "python -m soho.train"),
        ("soho-finetune", "--task", "python -m soho.finetune"),
        ("soho-evaluate", "--checkpoint", "python -m soho.evaluate"),
        ("soho-data", "merge-manifests", "python -m data_pipeline"),
        ("soho-shard", "--samples-per-shard", "python -m data_pipeline shard")]


@pytest.mark.parametrize(("script", "flag", "prog"), HELP, ids=[h[0] for h in HELP])
def test_each_console_script_answers_help(script: str, flag: str, prog: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    func = md.EntryPoint(script, SCRIPTS[script], "console_scripts").load()
    with pytest.raises(SystemExit) as exit_info:
        func(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {prog} ") and flag in out


def test_soho_shard_is_data_pipeline_shard(tmp_path: Path) -> None:
    """`soho-shard ARGS` runs `python -m data_pipeline shard ARGS`: same shards from the same folder."""
    from PIL import Image

    from data_pipeline.cli import main, shard_main

    src = tmp_path / "images"
    src.mkdir()
    for i, color in enumerate(["red", "green", "blue"]):
        Image.new("RGB", (40, 30), color).save(src / f"{color}.jpg")
        (src / f"{color}.txt").write_text(f"a {color} picture number {i}")
    args = ["--source", str(src), "--source-format", "folder", "--workers", "0", "--samples-per-shard", "2",
            "--no-progress"]
    assert shard_main([*args, "--output", str(tmp_path / "a")]) == 0
    assert main(["shard", *args, "--output", str(tmp_path / "b")]) == 0
    shards_a = sorted(p.name for p in (tmp_path / "a").glob("*.tar"))
    assert shards_a == ["shards-000000.tar", "shards-000001.tar"]
    for name in shards_a:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


_INSTALLED = Path(sys.executable).parent / "soho-train"


@pytest.mark.skipif(not _INSTALLED.exists(),
                    reason=f"{_INSTALLED} not installed yet: reinstall the package "
                           "(make install / pip install -e .)")
def test_installed_soho_train_script_runs_as_a_program() -> None:
    installed = {ep.name: ep.value for ep in md.distribution("soho-at-scale").entry_points
                 if ep.group == "console_scripts"}
    assert installed == SCRIPTS
    proc = subprocess.run([str(_INSTALLED), "--help"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--max-steps" in proc.stdout and "--fault" not in proc.stdout
