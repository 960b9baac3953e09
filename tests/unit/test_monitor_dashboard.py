"""The shipped Grafana dashboard: valid JSON with a Prometheus datasource variable, naming only metrics the node
exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import cxr_node.metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana" / "cxr-node.json"


def test_the_dashboard_uses_a_prometheus_datasource_variable() -> None:
    """Every panel and query reads the ``$datasource`` variable, which is a Prometheus datasource."""
    found = json.loads(DASHBOARD.read_text())
    [variable] = [v for v in found["templating"]["list"] if v["type"] == "datasource"]
    assert (variable["name"], variable["query"]) == ("datasource", "prometheus")
    for panel in (p for p in found["panels"] if p["type"] != "row"):
        assert panel["datasource"]["uid"] == "${datasource}"
        assert all(target["datasource"]["uid"] == "${datasource}" for target in panel.get("targets", []))
    assert len({panel["id"] for panel in found["panels"]}) == len(found["panels"])


def test_the_dashboard_names_only_exported_metrics() -> None:
    """Each metric a query names is defined in cxr_node/metrics.py (a histogram's _bucket and _count included)."""
    source = Path(cxr_node.metrics.__file__).read_text()
    exported = set(re.findall(r'"cxr_node_(\w+)"', source)) | set(re.findall(r'_gauge\(\s*"(\w+)"', source))
    exported |= {f"monitor_{name}" for name in cxr_node.metrics.MONITOR_METRICS}
    queries = [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p.get("targets", [])]
    named = {m for q in queries for m in re.findall(r"cxr_node_(\w+?)(?:_bucket|_count)?(?=[{\[\s)]|$)", q)}
    assert named and named <= exported, sorted(named - exported)
