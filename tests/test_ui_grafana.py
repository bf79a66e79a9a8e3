"""deploy/grafana/margin.json: well-formed, and every metric its panels query is one margin exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from margin.telemetry import Telemetry

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "margin.json"
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"), "gauge": ("",)}
# The cache-hit and budget-utilisation panels' metrics (added for this dashboard).
PROPOSED = {"margin_cache_lookups_total", "margin_budget_used_ratio"}
# PromQL words that look like metric names but are functions, keywords or label names.
NOT_METRICS = {"sum", "rate", "increase", "histogram_quantile", "max", "by", "le", "team", "model", "status", "budget",
               "action", "cap", "limit", "result", "gen_ai_token_type", "label_values", "irate", "avg", "without"}


def exported() -> set[str]:
    names: set[str] = set()
    for family in Telemetry().registry.collect():
        names |= {family.name + s for s in SUFFIXES.get(family.type, ("",))}
    return names


def queries(dash: dict) -> list[str]:  # type: ignore[type-arg]
    out = []
    for p in dash["panels"]:
        out += [t["expr"] for t in p.get("targets", [])]
    out += [v["definition"] for v in dash["templating"]["list"] if v.get("definition")]
    return out


def test_dashboard_is_valid_and_queries_only_exported_metrics() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["schemaVersion"] >= 36
    titles = [p["title"] for p in dash["panels"]]
    for want in ("Cost rate by team (USD/h)", "Tokens per second by type", "Call duration percentiles",
                 "Error rate", "Cache hit rate", "Budget utilisation"):
        assert want in titles
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
    known = exported()
    used = set()
    for q in queries(dash):
        assert q.count("(") == q.count(")"), q
        for name in re.findall(r"\b([a-z_][a-z0-9_]*)\b(?=\s*[{\[)(,]|\s*$)", re.sub(r'"[^"]*"', '""', q)):
            if name not in NOT_METRICS and not name.startswith("__"):
                used.add(name)
    assert used, "no metric found in the panels"
    missing = sorted(used - known - PROPOSED)
    assert not missing, f"panels query metrics margin does not export: {missing}"


def test_proposed_metrics_are_exported() -> None:
    assert exported() >= PROPOSED
