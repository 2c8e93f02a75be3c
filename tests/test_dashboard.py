"""The shipped dashboard and alerting rules name only series the gateway exports, and import as they are.

The full check runs their queries against a real Prometheus (`make check-dashboard`,
tests/check_dashboard.py); this part needs no Prometheus and runs with every `make test`.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from gateway.metrics import Metrics
from tests.check_dashboard import ALERTS, DASHBOARD, check_dashboard_shape, panel_queries

_SERIES: re.Pattern[str] = re.compile(r"\baenv_[a-z_]+")


def exported_series() -> set[str]:
    """Every sample name Metrics.build registers: counters' _total, histograms' _bucket/_sum/_count."""
    registry = CollectorRegistry()
    Metrics.build(registry)
    names: set[str] = set()
    for family in registry.collect():
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}.get(family.type, ("",))
        names.update(family.name + suffix for suffix in suffixes)
    return names


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def test_every_panel_query_names_a_series_the_gateway_exports() -> None:
    queries, exported = panel_queries(dashboard()), exported_series()
    unknown = [(title, name) for title, expr in queries for name in _SERIES.findall(expr) if name not in exported]
    assert len(queries) >= 20 and unknown == []


def test_the_dashboard_imports_with_a_datasource_variable() -> None:
    shown = dashboard()
    check_dashboard_shape(shown)  # exits naming the panel otherwise
    assert "__inputs" not in shown  # nothing to map at import: the variable picks the data source
    ids = [panel["id"] for panel in shown["panels"]]
    assert len(ids) == len(set(ids))


def test_a_panel_that_does_not_use_the_variable_is_refused() -> None:
    broken = dashboard()
    broken["panels"][1]["datasource"] = {"type": "prometheus", "uid": "my-prometheus"}
    with pytest.raises(SystemExit):
        check_dashboard_shape(broken)


def test_every_alert_names_exported_series_and_says_why() -> None:
    rules = yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]
    names = {rule["alert"] for rule in rules}
    assert {"MCPGatewayHighErrorRatio", "MCPGatewayUpstreamErrors", "MCPGatewayDrainStuck",
            "MCPGatewayNoTraffic"} <= names
    for rule in rules:
        assert set(_SERIES.findall(rule["expr"])) <= exported_series(), rule["alert"]
        assert rule["annotations"]["summary"] and rule["labels"]["severity"] in ("page", "warning")
