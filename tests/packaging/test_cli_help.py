"""What a user reads in --help: `soho.train` hides the test-only fault flags (still accepted), and every
option of `data_pipeline shard` has a description and shows its default (or says it is required)."""

from __future__ import annotations

import argparse
import re

import pytest

import configcli


def _help(func, argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:  # noqa: ANN001 - a CLI main
    with pytest.raises(SystemExit) as exit_info:
        func(argv)
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def _options(help_text: str) -> dict[str, str]:
    """{first option string: its description, wrapped lines joined} from argparse's option sections."""
    entries: dict[str, str] = {}
    current: str | None = None
    in_options = False
    for line in help_text.splitlines():
        if line and not line.startswith(" "):  # a section header ("options:", "object storage ...:")
            in_options = line.endswith(":") and not line.startswith("usage:")
            current = None
            continue
        if not in_options or not line.strip():
            continue
        if re.match(r"^  -", line):  # an option: its strings, then (after 2+ spaces) its description
            head, _, desc = line.strip().partition("  ")
            current = head.split()[0].rstrip(",")
            entries[current] = desc.strip()
        elif current is not None:
            entries[current] = f"{entries[current]} {line.strip()}".strip()
    return entries


def test_train_help_hides_the_fault_flags_which_still_work(capsys: pytest.CaptureFixture[str]) -> None:
    from orchestration.pretrain.cli import main
    from orchestration.pretrain.config import RunConfig, parse_run_config

    text = _help(main, ["--help"], capsys)
    assert "--fault" not in text and "TEST ONLY" not in text
    options = _options(text)
    fields = [leaf.name for leaf in configcli.leaves(RunConfig)]
    fault = [n for n in fields if n.startswith("fault_")]
    assert len(fault) >= 4
    listed = {"--" + n.replace("_", "-") for n in fields if not n.startswith("fault_")}
    assert listed <= set(options), sorted(listed - set(options))  # every other option is listed ...
    assert all(options[f] for f in listed)  # ... with its description
    cfg = parse_run_config(["--fault-kill-after-checkpoint", "3", "--fault-kill-rank", "0",
                            "--fault-crash-during-checkpoint", "4", "--fault-nonfinite-batches", "1,5",
                            "--fault-nonfinite-grad-batches", "7"])
    assert (cfg.faults.fault_kill_after_checkpoint, cfg.faults.fault_kill_rank,
            cfg.faults.fault_crash_during_checkpoint, cfg.faults.fault_nonfinite_batches,
            cfg.faults.fault_nonfinite_grad_batches) == (3, 0, 4, [1, 5], [7])


def test_every_shard_option_has_a_description_and_its_default(capsys: pytest.CaptureFixture[str]) -> None:
    from configcli import defaults_of
    from data_pipeline.cli import build_parser, main
    from data_pipeline.shard import ShardJobConfig

    text = _help(main, ["shard", "--help"], capsys)
    options = _options(text)
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    actions = [a for a in sub.choices["shard"]._actions
               if a.help is not argparse.SUPPRESS and a.dest != "help"]
    assert set(options) - {"-h"} == {a.option_strings[0] for a in actions}  # the parse found every option
    assert len(actions) >= 28
    squash = lambda s: re.sub(r"\s+", "", s)  # noqa: E731 - argparse wraps (and may break at hyphens)
    config_defaults = defaults_of(ShardJobConfig)
    for action in actions:
        flag = action.option_strings[0]
        desc = options[flag]
        words = re.sub(r"[([](default|required)[^)\]]*[)\]]$", "", desc).split()
        assert len(words) >= 3, f"{flag}: no description: {desc!r}"
        if action.required:
            assert desc.endswith("(required)") and not desc.endswith("(required) (required)"), flag
        elif action.default is argparse.SUPPRESS:  # a field of ShardJobConfig: the dataclass default
            default = config_defaults[action.dest]
            if isinstance(action, argparse._StoreFalseAction):  # --ignore-noai, --no-progress: off by default
                default = not default
            if "(default: " not in desc:  # else the help says where the value comes from
                assert squash(desc).endswith(squash(f"[default: {default}]")), f"{flag}: {desc!r}"
        elif action.default is None:  # unset: "(default: None)", or where the value then comes from
            assert "(default: " in desc, f"{flag}: {desc!r}"
        else:
            assert squash(desc).endswith(squash(f"(default: {action.default})")), f"{flag}: {desc!r}"
    # The defaults shown are the job config's.
    d = ShardJobConfig(source="", output="")
    for flag, value in (("--samples-per-shard", d.samples_per_shard), ("--max-image-side", d.max_image_side),
                        ("--dedupe-window", d.dedupe_window), ("--url-timeout", d.url_timeout),
                        ("--ignore-noai", False), ("--no-progress", False), ("--columns", None)):
        assert squash(options[flag]).endswith(f"[default:{value}]"), flag
    assert options["--job-index"].endswith("(default: $JOB_COMPLETION_INDEX or 0)")
    assert options["--image-root"].endswith("(default: the source's own folder)")
    assert options["--source"].endswith("(required)") and options["--output"].endswith("(required)")
