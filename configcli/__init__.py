"""Dataclass configs as command-line flags and YAML files — one generator for every CLI of the project.

A config is a dataclass whose fields are either leaves (``int``, ``float``, ``str``, ``bool``, ``list[int]``,
``X | None``) or *sections*: fields whose type is itself such a dataclass (``optim: OptimConfig``). Flags and
YAML keys are flat and named after the leaves (``--max-steps`` / ``max_steps`` / ``max-steps``), whatever
section a leaf lives in, so a config can be re-sectioned without changing a flag or a file.

* :func:`opt` — the ``metadata`` of a field: help text, ``choices``, and the CLI spelling when it is not
  ``--field-name`` (``negated_flag="ignore-noai"``: a store-false switch for a bool field that defaults to
  True; ``hidden=True``: accepted but not listed in ``--help``).
* :func:`add_flags` — argparse flags of every leaf. Defaults are suppressed, so what the user typed can be
  told from what was left out: flags > YAML file > the dataclass defaults.
* :func:`from_flat` / :func:`to_flat` — a flat ``{leaf: value}`` mapping to the nested config and back; values
  are coerced from strings (YAML, env, flags) and unknown keys are refused with the list of known ones.
* :func:`parse` — argv (+ ``--config FILE.yaml``) to a config instance.

This package imports nothing of the project's, so ``data_pipeline``, ``orchestration`` and tools may all use
it.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = ["Leaf", "opt", "leaves", "add_flags", "from_flat", "to_flat", "parse", "load_yaml", "defaults_of"]


def opt(help: str, **extra: Any) -> dict[str, Any]:
    """Field metadata: ``field(default=1, metadata=opt("what it does", choices=(1, 2)))``."""
    return {"help": help, **extra}


@dataclass(frozen=True)
class Leaf:
    """One flag: its name, where it lives (``("optim", "lr")``), its scalar type and whether it is a list."""

    name: str
    path: tuple[str, ...]
    field: dataclasses.Field
    type: type
    is_list: bool

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap(tp: Any) -> tuple[Any, bool]:
    """(scalar type, is_list) of an annotation such as ``int | None`` or ``list[int]``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0]
        origin = typing.get_origin(tp)
    if origin is list:
        return typing.get_args(tp)[0], True
    return tp, False


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def leaves(cls: type, _prefix: tuple[str, ...] = ()) -> list[Leaf]:
    """Every leaf of ``cls``, sections flattened in field order; leaf names are unique across sections."""
    out: list[Leaf] = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        if _is_section(tp):
            out.extend(leaves(tp, _prefix + (f.name,)))
            continue
        scalar, is_list = _unwrap(tp)
        out.append(Leaf(f.name, _prefix + (f.name,), f, scalar, is_list))
    if not _prefix:
        seen: dict[str, tuple[str, ...]] = {}
        for leaf in out:
            if leaf.name in seen:
                raise TypeError(f"{cls.__name__}: leaf {leaf.name!r} appears in {seen[leaf.name]} "
                                f"and {leaf.path}")
            seen[leaf.name] = leaf.path
    return out


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def defaults_of(cls: type) -> dict[str, Any]:
    """Flat defaults of ``cls`` (a section's defaults are the parent's, e.g. ``field(default_factory=...)``);
    required leaves are absent."""
    out: dict[str, Any] = {}
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        default = _field_default(f)
        if _is_section(hints[f.name]):
            section = default if default is not dataclasses.MISSING else None
            if section is None:
                out.update(defaults_of(hints[f.name]))
            else:
                out.update(to_flat(section))
        elif default is not dataclasses.MISSING:
            out[f.name] = default
    return out


def coerce(leaf: Leaf, value: Any, source: str) -> Any:
    """``value`` (from YAML, a flag string or Python) as the leaf's type; a clear error naming the option."""
    tp = leaf.type
    if value is None:
        default = _field_default(leaf.field)
        return [] if leaf.is_list and default is not None and default is not dataclasses.MISSING else None
    try:
        if leaf.is_list:
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            return [tp(v) for v in value]
        if tp is bool:
            if isinstance(value, str):
                low = value.lower()
                if low not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return low in ("true", "1", "yes")
            return bool(value)
        if tp is Any or tp is dict or typing.get_origin(tp) is dict:
            return value
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return tp(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{source}: option {leaf.name!r} expects {getattr(tp, '__name__', tp)}, "
                         f"got {value!r}") from exc


def from_flat(cls: type, values: Mapping[str, Any], source: str = "config") -> Any:
    """The nested ``cls`` built from flat ``{leaf name: value}`` (``-`` or ``_`` in names); leaves not given
    keep their defaults (a section's defaults come from the parent's ``default_factory``)."""
    by_name = {leaf.name: leaf for leaf in leaves(cls)}
    given: dict[str, Any] = {}
    for raw_key, value in values.items():
        key = str(raw_key).replace("-", "_")
        if key not in by_name:
            raise ValueError(f"{source}: unknown option {raw_key!r}; known options: {sorted(by_name)}")
        given[key] = coerce(by_name[key], value, source)
    return _build(cls, given)


def _build(cls: type, given: dict[str, Any]) -> Any:
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        if _is_section(tp):
            names = {leaf.name for leaf in leaves(tp, (f.name,))}
            mine = {k: v for k, v in given.items() if k in names}
            default = _field_default(f)
            if default is dataclasses.MISSING:
                kwargs[f.name] = _build(tp, mine)
            else:
                kwargs[f.name] = dataclasses.replace(default, **mine) if mine else default
        elif f.name in given:
            kwargs[f.name] = given[f.name]
    return cls(**kwargs)


def to_flat(obj: Any) -> dict[str, Any]:
    """``{leaf name: value}`` of a config instance (JSON-able when its values are)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out.update(to_flat(value))
        else:
            out[f.name] = list(value) if isinstance(value, list) else value
    return out


def add_flags(parser: argparse.ArgumentParser | Any, cls: type, *,
              skip: tuple[str, ...] = (), defaults: Mapping[str, Any] | None = None) -> None:
    """One flag per leaf of ``cls`` (except ``skip``), default suppressed; the help shows the default.

    bool → ``--x/--no-x`` (or the field's ``negated_flag``, a store-false switch); list → a comma-separated
    string; ``choices`` from the metadata; a leaf without a default is a required flag."""
    shown = defaults_of(cls) if defaults is None else dict(defaults)
    for leaf in leaves(cls):
        if leaf.name in skip:
            continue
        meta = leaf.field.metadata
        required = (leaf.field.default is dataclasses.MISSING
                    and leaf.field.default_factory is dataclasses.MISSING)  # type: ignore[misc]
        text = meta.get("help", "")
        if required:
            text = f"{text} (required)"
        elif "(default" not in text:
            default = shown.get(leaf.name)
            if meta.get("negated_flag") and isinstance(default, bool):
                default = not default  # the switch's own default: --ignore-noai is off unless given
            if isinstance(default, list):
                default = ",".join(str(v) for v in default)
            text = f"{text} [default: {default}]"
        if meta.get("hidden"):
            text = argparse.SUPPRESS
        kwargs: dict[str, Any] = {"dest": leaf.name, "help": text, "default": argparse.SUPPRESS}
        if required:
            kwargs["required"] = True
        if leaf.type is bool and not leaf.is_list:
            negated = meta.get("negated_flag")
            if negated:
                parser.add_argument("--" + negated, action="store_false", **kwargs)
            else:
                parser.add_argument(leaf.flag, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if leaf.is_list:
            kwargs["type"] = str
        elif leaf.type in (int, float, str):
            kwargs["type"] = leaf.type
        else:
            kwargs["type"] = str
        if "choices" in meta:
            kwargs["choices"] = meta["choices"]
        parser.add_argument(leaf.flag, **kwargs)


def load_yaml(path: str | Path, flag: str = "--config") -> dict[str, Any]:
    """A YAML mapping of option: value; a clear error naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{flag} {path}: no such file")
    with path.open("r", encoding="utf-8") as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{flag} {path}: expected a mapping of option: value, got {type(data).__name__}")
    return data


def parse(cls: type, parser: argparse.ArgumentParser, argv: list[str] | None,
          adjust: Callable[[dict[str, Any]], None] | None = None) -> tuple[Any, dict[str, Any]]:
    """(config, the other parsed arguments). The parser must hold :func:`add_flags` of ``cls`` and may have
    ``--config`` (a YAML file of options: dataclass defaults < file < flags) and flags of its own, which are
    returned in the second value. ``adjust`` may edit the merged flat values before the config is built."""
    args = vars(parser.parse_args(argv))
    names = {leaf.name for leaf in leaves(cls)}
    extra = {k: v for k, v in args.items() if k not in names}
    merged: dict[str, Any] = {}
    config_path = extra.pop("config", None)
    if config_path is not None:
        merged.update({str(k).replace("-", "_"): v for k, v in load_yaml(config_path).items()})
    merged.update({k: v for k, v in args.items() if k in names})
    if adjust is not None:
        adjust(merged)
    source = f"--config {config_path} / flags" if config_path else "flags"
    return from_flat(cls, merged, source=source), extra
