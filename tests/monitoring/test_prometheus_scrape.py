"""A real Prometheus (Debian binary, 127.0.0.1) scrapes a SohoMetrics endpoint fed by the test; the query
API returns the fed values, and every PromQL expression of the dashboard and the rules parses and evaluates
against it (the dashboard's with at least one series)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestration.runtime.metrics import SohoMetrics
from tests.helpers_prometheus import LABEL_VALUES, PrometheusServer, dashboard_expressions, rule_expressions

pytestmark = [pytest.mark.integration, pytest.mark.prometheus, pytest.mark.slow]


@pytest.fixture
def fed_metrics() -> Iterator[SohoMetrics]:
    m = SohoMetrics(rank=0)
    m.set_vd_num_codes(2048)
    # A collapsing dictionary: usage 5%, perplexity far below k.
    m.set_vd_health({"usage_ratio": 0.05, "perplexity": 37.5, "dead_codes": 1900, "decay": 0.99})
    m.observe_step({"mlm": 2.25, "mvm": 7.5, "itm": 0.625, "total": 10.375}, 32, 0.4, 0.1)
    m.observe_checkpoint(step=1, seconds=3.0)
    m.set_bad_samples({"decode_error": 2})
    m.set_eval({("t2i", 1): 0.125, ("i2t", 5): 0.5})
    m.set_eval_figures(0.75, 2.5)
    m.inc_nonfinite()
    m.start_http_server(0, addr="127.0.0.1")
    try:
        yield m
    finally:
        m.stop_http_server()


def _feed_steps(m: SohoMetrics, n: int) -> None:
    for i in range(n):
        m.observe_step({"mlm": 2.25, "mvm": 7.5, "itm": 0.625, "total": 10.375}, 32, 0.4 + 0.1 * i, 0.1)
    m.set_bad_samples({"decode_error": 2 + n, "empty_caption": 1})
    m.inc_nonfinite()


def test_prometheus_scrapes_soho_metrics_and_evaluates_every_expression(
    tmp_path: Path, fed_metrics: SohoMetrics
) -> None:
    target = f"127.0.0.1:{fed_metrics.port}"
    with PrometheusServer(tmp_path / "prom", [target], scrape_interval="1s") as prom:
        loss = prom.wait_for('soho_train_loss{task="mlm"}')
        assert len(loss) == 1
        assert loss[0]["metric"]["rank"] == "0" and loss[0]["metric"]["instance"] == target
        assert float(loss[0]["value"][1]) == 2.25
        ppl = prom.query("soho_vd_perplexity")
        assert [float(s["value"][1]) for s in ppl] == [37.5]
        assert [t["scrapeUrl"] for t in prom.targets_up()] == [f"http://{target}/metrics"]
        assert [float(s["value"][1]) for s in prom.query("soho_eval_itm_accuracy")] == [0.75]
        assert [float(s["value"][1]) for s in prom.query("soho_eval_seconds")] == [2.5]

        # Counters move between scrapes so that rate()/increase()/histogram_quantile() have data.
        for _ in range(3):
            _feed_steps(fed_metrics, 2)
            time.sleep(1.2)
        prom.wait_for("soho_train_steps_total >= 7")
        prom.wait_for("rate(soho_train_samples_total[1m]) > 0")

        for where, expr in dashboard_expressions().items():
            variable = LABEL_VALUES.match(expr)
            if variable:  # Grafana's label_values() goes through the label-values API, not PromQL
                metric, label = variable.groups()
                assert prom.api(f"label/{label}/values", **{"match[]": metric}) == ["0"], where
                continue
            result = prom.query(expr)  # raises with Prometheus' parse/eval error
            assert result, f"dashboard {where}: {expr!r} returned no series"

        firing = {}
        for alert, expr in rule_expressions().items():
            firing[alert] = {s["metric"].get("rank") for s in prom.query(expr)}
        # The fed dictionary is collapsed, so those conditions hold; a fresh checkpoint and 7 steps are
        # healthy.
        assert firing["SohoCodebookCollapse"] == {"0"}
        assert firing["SohoVDPerplexityLow"] == {"0"}
        assert firing["SohoCheckpointTooOld"] == set()
        assert firing["SohoTrainingStalled"] == set()

        samples = prom.query("soho_train_samples_total")
        assert float(samples[0]["value"][1]) == fed_metrics.value("soho_train_samples_total") == 32 * 7
        bad = {s["metric"]["reason"]: float(s["value"][1]) for s in prom.query("soho_data_bad_samples_total")}
        # The loader reported cumulative totals 2, 4, 4, 4: the counter holds 4, not their sum.
        assert bad == {"decode_error": 4.0, "empty_caption": 1.0}
