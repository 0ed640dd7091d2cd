"""The PrometheusRule's alerts: `promtool check rules`, `promtool test rules` (one firing and one silent
case per alert), a mutated rule that the unit tests catch, and annotations that say what to do."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.helpers_prometheus import (
    PROMTOOL_BIN,
    RULES_MANIFEST,
    require_binary,
    rule_groups,
    write_rules_file,
)

PROMTOOL_TESTS = Path(__file__).resolve().parent / "promtool" / "soho_alerts_test.yaml"
ALERTS = {
    "SohoCodebookCollapse",
    "SohoVDPerplexityLow",
    "SohoVDDeadCodesRising",
    "SohoNonFiniteSteps",
    "SohoTrainingStalled",
    "SohoCheckpointTooOld",
    "SohoBadSampleRateHigh",
}

pytestmark = pytest.mark.prometheus


def _promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_binary(PROMTOOL_BIN), *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def _unit_test(tmp_path: Path, rules_manifest: Path = RULES_MANIFEST) -> subprocess.CompletedProcess[str]:
    shutil.copy(PROMTOOL_TESTS, tmp_path / PROMTOOL_TESTS.name)
    write_rules_file(tmp_path / "soho_rules.yaml", strip_annotations=True, manifest=rules_manifest)
    return _promtool("test", "rules", PROMTOOL_TESTS.name, cwd=tmp_path)


def test_rules_define_the_expected_alerts_with_actionable_annotations() -> None:
    rules = [r for g in rule_groups() for r in g["rules"]]
    assert {r["alert"] for r in rules} == ALERTS
    for r in rules:
        assert r["labels"]["severity"] in {"warning", "critical"}, r["alert"]
        assert set(r["annotations"]) == {"summary", "description"}, r["alert"]
        assert "{{ $labels.rank }}" in r["annotations"]["summary"], r["alert"]
        # The description tells the operator what to do, naming a flag, panel or command.
        assert any(w in r["annotations"]["description"] for w in ("--", "panel", "kubectl")), r["alert"]


def test_promtool_check_rules(tmp_path: Path) -> None:
    rules_file = write_rules_file(tmp_path / "soho_rules.yaml")
    proc = _promtool("check", "rules", str(rules_file), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in proc.stdout


def test_promtool_unit_tests_cover_every_alert_firing_and_silent() -> None:
    tests = yaml.safe_load(PROMTOOL_TESTS.read_text())["tests"]
    fires: set[str] = set()
    silent: set[str] = set()
    for case in tests:
        for check in case["alert_rule_test"]:
            (fires if check["exp_alerts"] else silent).add(check["alertname"])
    assert fires == ALERTS
    assert silent == ALERTS


def test_promtool_test_rules_pass(tmp_path: Path) -> None:
    proc = _unit_test(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_promtool_unit_tests_catch_a_wrong_threshold(tmp_path: Path) -> None:
    doc = yaml.safe_load(RULES_MANIFEST.read_text())
    for group in doc["spec"]["groups"]:
        for rule in group["rules"]:
            if rule["alert"] == "SohoCodebookCollapse":
                rule["expr"] = "soho_vd_usage_ratio < 0.01"  # would miss the collapse at 5% usage
    mutated = tmp_path / "mutated-rule.yaml"
    mutated.write_text(yaml.safe_dump(doc))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    proc = _unit_test(run_dir, rules_manifest=mutated)
    assert proc.returncode != 0
    assert "collapse fires when usage stays low" in proc.stdout + proc.stderr
