"""A real Prometheus server for tests, and the PromQL of our rules and dashboard.

`PrometheusServer` starts the Debian `prometheus` binary on a free 127.0.0.1 port with a temporary
config and data dir, scraping the loopback targets it is given; `query()` goes through the HTTP API.
Reused by tests/monitoring and by the live-run scrape test of orchestration.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
RULES_MANIFEST = REPO_ROOT / "k8s" / "base" / "monitoring" / "prometheusrule.yaml"
DASHBOARD_JSON = REPO_ROOT / "k8s" / "base" / "monitoring" / "dashboards" / "soho-training.json"
PROMETHEUS_BIN = "prometheus"
PROMTOOL_BIN = "promtool"

# Grafana's variables as the tests substitute them: all ranks, a range that covers a short test run.
GRAFANA_SUBSTITUTIONS = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "5m",
    "$rank": ".*",
    "${rank}": ".*",
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise FileNotFoundError(f"{name} not found on PATH; `make test-deps` installs Debian's prometheus")
    return path


class PrometheusServer:
    """One Prometheus process scraping `targets` ("127.0.0.1:port") every `scrape_interval`."""

    def __init__(
        self,
        workdir: Path,
        targets: list[str],
        scrape_interval: str = "1s",
        rule_files: list[Path] | None = None,
        job: str = "soho",
    ) -> None:
        for target in targets:
            host = target.rsplit(":", 1)[0]
            if host not in ("127.0.0.1", "localhost"):
                raise ValueError(f"target {target!r} is not on loopback; tests never scrape other hosts")
        self.workdir = Path(workdir)
        self.targets = list(targets)
        self.scrape_interval = scrape_interval
        self.rule_files = [Path(p) for p in rule_files or []]
        self.job = job
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_path = self.workdir / "prometheus.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> PrometheusServer:
        binary = require_binary(PROMETHEUS_BIN)
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "global": {"scrape_interval": self.scrape_interval, "evaluation_interval": self.scrape_interval},
            "rule_files": [str(p) for p in self.rule_files],
            "scrape_configs": [{"job_name": self.job, "static_configs": [{"targets": self.targets}]}],
        }
        config_path = self.workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        # Another process may take the port between free_port() and bind: retry a few times.
        for _ in range(5):
            self.port = free_port()
            log = self._log_path.open("ab")
            self._proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config_path}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            log.close()
            if self._wait_ready(timeout):
                return self
            self.stop()
        raise RuntimeError(f"prometheus did not become ready; log:\n{self.log()[-3000:]}")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return True
            except OSError:
                pass
            time.sleep(0.2)
        return False

    def log(self) -> str:
        return self._log_path.read_text(errors="replace") if self._log_path.exists() else ""

    def stop(self) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)
        self._proc = None

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- HTTP API --------------------------------------------------------------------------------
    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>; returns `data`, raises RuntimeError with Prometheus' error otherwise."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=30) as resp:
                body = json.loads(resp.read())
        except urllib.error.HTTPError as err:
            body = json.loads(err.read() or b"{}")
        if body.get("status") != "success":
            raise RuntimeError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; a list of {"metric": labels, "value": [t, "v"]} (scalars become one entry)."""
        data = self.api("query", query=expr)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def wait_for(self, expr: str, timeout: float = 60.0, min_series: int = 1) -> list[dict[str, Any]]:
        """Poll `expr` until it returns at least `min_series` series."""
        deadline = time.monotonic() + timeout
        result: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            result = self.query(expr)
            if len(result) >= min_series:
                return result
            time.sleep(0.5)
        raise TimeoutError(
            f"{expr!r} returned {len(result)} series after {timeout}s; log:\n{self.log()[-2000:]}"
        )

    def targets_up(self) -> list[dict[str, Any]]:
        return [t for t in self.api("targets")["activeTargets"] if t["health"] == "up"]


# --- the PromQL of k8s/ ------------------------------------------------------------------------------


def rule_groups(manifest: Path = RULES_MANIFEST) -> list[dict[str, Any]]:
    """The rule groups of the PrometheusRule, i.e. a plain Prometheus rules file's `groups`."""
    doc = yaml.safe_load(manifest.read_text())
    assert doc["kind"] == "PrometheusRule", manifest
    return doc["spec"]["groups"]


def write_rules_file(path: Path, strip_annotations: bool = False, manifest: Path = RULES_MANIFEST) -> Path:
    groups = rule_groups(manifest)
    if strip_annotations:
        groups = [
            {**g, "rules": [{k: v for k, v in r.items() if k != "annotations"} for r in g["rules"]]}
            for g in groups
        ]
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return path


def rule_expressions(manifest: Path = RULES_MANIFEST) -> dict[str, str]:
    """{alert or record name: expr}."""
    return {r.get("alert") or r["record"]: r["expr"] for g in rule_groups(manifest) for r in g["rules"]}


def dashboard_expressions(path: Path = DASHBOARD_JSON, substitute: bool = True) -> dict[str, str]:
    """{"<panel title>/<refId>": expr} for every target, plus the template variables' queries."""
    dash = json.loads(path.read_text())
    out: dict[str, str] = {}

    def walk(panels: list[dict[str, Any]]) -> None:
        for p in panels:
            for t in p.get("targets", []):
                out[f"{p['title']}/{t['refId']}"] = t["expr"]
            walk(p.get("panels", []))

    walk(dash["panels"])
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            out["$" + var["name"]] = q
    if substitute:
        out = {k: substitute_grafana(v) for k, v in out.items()}
    return out


def substitute_grafana(expr: str) -> str:
    # Longest first, so "$__rate_interval" is not eaten by a shorter name.
    for key in sorted(GRAFANA_SUBSTITUTIONS, key=len, reverse=True):
        expr = expr.replace(key, GRAFANA_SUBSTITUTIONS[key])
    return expr


LABEL_VALUES = re.compile(r"^label_values\((\w+),\s*(\w+)\)$")
_PROMQL_KEYWORDS = {
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
    "inf",
    "nan",
}


def metric_names_in(expr: str) -> set[str]:
    """Metric names an expression selects (functions, keywords, label names and durations removed).

    Grafana's `label_values(metric, label)` counts as a selection of `metric`.
    """
    m = LABEL_VALUES.match(expr.strip())
    if m:
        return {m.group(1)}
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals (label values, regexes)
    s = re.sub(r"\{[^}]*\}", "", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", "", s)  # range / subquery durations
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)  # label lists
    names = set()
    for match in re.finditer(r"(?<![\w.:$])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", s):
        word, is_call = match.group(1), match.group(2)
        if is_call or word.lower() in _PROMQL_KEYWORDS:
            continue
        names.add(word)
    return names
