"""Every PromQL expression of the dashboard and the rules selects only metrics the trainer exports."""

from __future__ import annotations

import json

import pytest

from orchestration.runtime.metrics import HISTOGRAM_NAMES, METRIC_NAMES
from tests.helpers_prometheus import DASHBOARD_JSON, dashboard_expressions, metric_names_in, rule_expressions

HISTOGRAM_SERIES = {f"{h}_{s}" for h in HISTOGRAM_NAMES for s in ("bucket", "sum", "count")}
# A histogram is selected through its _bucket/_sum/_count series, never by its bare family name.
EXPORTED_SERIES = (set(METRIC_NAMES) - set(HISTOGRAM_NAMES)) | HISTOGRAM_SERIES


def test_metric_name_extraction() -> None:
    expr = (
        "histogram_quantile(0.95, sum by (le) "
        '(rate(soho_train_step_duration_seconds_bucket{rank=~".*"}[1m])))'
        " / on(rank) group_left soho_vd_num_codes > bool 1e3 and up offset 5m"
    )
    assert metric_names_in(expr) == {"soho_train_step_duration_seconds_bucket", "soho_vd_num_codes", "up"}
    assert metric_names_in("label_values(soho_train_steps_total, rank)") == {"soho_train_steps_total"}


@pytest.mark.parametrize("source", ["dashboard", "rules"], ids=["dashboard", "rules"])
def test_expressions_use_only_exported_metrics(source: str) -> None:
    exprs = dashboard_expressions() if source == "dashboard" else rule_expressions()
    assert len(exprs) >= (20 if source == "dashboard" else 7)
    used: set[str] = set()
    for where, expr in exprs.items():
        names = metric_names_in(expr)
        assert names, f"{where}: {expr!r} selects no metric"
        assert names <= EXPORTED_SERIES, (
            f"{where}: {sorted(names - EXPORTED_SERIES)} not exported by SohoMetrics"
        )
        used |= names
    if source == "dashboard":
        # The panels: losses, VD usage/perplexity/dead codes, samples/s, step-time quantiles,
        # data-wait fraction, checkpoint age and duration, non-finite steps, bad samples by reason.
        assert {
            "soho_train_loss",
            "soho_vd_usage_ratio",
            "soho_vd_perplexity",
            "soho_vd_dead_codes",
            "soho_train_samples_total",
            "soho_train_step_duration_seconds_bucket",
            "soho_data_wait_seconds_total",
            "soho_checkpoint_last_timestamp_seconds",
            "soho_checkpoint_save_duration_seconds_sum",
            "soho_train_nonfinite_steps_total",
            "soho_data_bad_samples_total",
        } <= used


def test_dashboard_has_a_rank_variable_used_by_every_panel() -> None:
    dash = json.loads(DASHBOARD_JSON.read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["rank"]["includeAll"] is True and variables["rank"]["multi"] is True
    raw = dashboard_expressions(substitute=False)
    panel_exprs = {k: v for k, v in raw.items() if not k.startswith("$")}
    assert all('rank=~"$rank"' in e for e in panel_exprs.values()), [
        k for k, e in panel_exprs.items() if 'rank=~"$rank"' not in e
    ]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
