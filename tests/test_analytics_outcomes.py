"""Outcomes: the POST /v1/outcomes validator, which outcome of a run counts, and cost per
successful outcome equal to the ledger's exact Decimal sum over successes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from margin.analytics.filters import Filter
from margin.analytics.outcomes import Baseline, counted, human_baseline, outcome_metrics, parse_outcome
from margin.analytics.runs import agentic_multiplier, cost_per_outcome, outcome_trend
from margin.analytics.warehouse import Warehouse
from tests.test_analytics_warehouse import T0, build_ledger

NOW = datetime(2026, 11, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([], "must be a JSON object"),
        ({"status": "success"}, "'run_id' is required"),
        ({"run_id": "", "status": "success"}, "'run_id' must be a non-empty string"),
        ({"run_id": "r", "status": "done"}, "'status' must be one of success, failure, escalated (got 'done')"),
        ({"run_id": "r", "status": "success", "value_usd": "12,5"}, "'value_usd' is not a decimal number"),
        ({"run_id": "r", "status": "success", "value_usd": -1}, "'value_usd' must be a finite amount >= 0"),
        ({"run_id": "r", "status": "success", "quality": 1.5}, "'quality' must be between 0 and 1"),
        ({"run_id": "r", "status": "success", "quality": True}, "'quality' must be a number"),
        ({"run_id": "r", "status": "success", "human_minutes": -2}, "'human_minutes' must be >= 0"),
        ({"run_id": "r", "status": "success", "metadata": [1]}, "'metadata' must be a JSON object"),
        ({"run_id": "r", "status": "success", "ts": "yesterday"}, "'ts' is not an ISO-8601 time"),
        ({"run_id": "r", "status": "success", "cost": 1}, "unknown field(s) ['cost']"),
        ({"run_id": "x" * 201, "status": "success"}, "longer than 200 characters"),
    ],
)
def test_parse_outcome_says_what_is_wrong(body: Any, message: str) -> None:
    with pytest.raises(ValueError) as e:
        parse_outcome(body, now=NOW)
    assert message in str(e.value)


def test_parse_outcome_row_and_idempotent_id() -> None:
    body = {"run_id": "case-42", "workflow": "kyc", "status": "success", "value_usd": 12.5, "quality": 0.9,
            "human_minutes": 4, "metadata": {"b": 1, "a": 2}}
    a, b = parse_outcome(body, now=NOW), parse_outcome(dict(body), now=NOW + timedelta(hours=1))
    assert a["outcome_id"] == b["outcome_id"]  # a retried POST is stored once
    assert a["value_usd"] == "12.5" and a["ts"] == NOW.isoformat() and a["metadata"] == '{"a":2,"b":1}'
    assert parse_outcome({**body, "status": "failure"}, now=NOW)["outcome_id"] != a["outcome_id"]
    assert parse_outcome({**body, "outcome_id": "mine"}, now=NOW)["outcome_id"] == "mine"
    naive = parse_outcome({"run_id": "r", "status": "success", "ts": "2026-11-05T10:00:00"}, now=NOW)
    assert naive["ts"] == "2026-11-05T10:00:00+00:00"


def test_latest_outcome_of_a_run_counts() -> None:
    rows = [parse_outcome({"run_id": "r", "status": "escalated", "ts": "2026-11-05T10:00:00Z"}, now=NOW),
            parse_outcome({"run_id": "r", "status": "success", "ts": "2026-11-05T12:00:00Z"}, now=NOW),
            parse_outcome({"run_id": "s", "status": "success", "ts": "2026-11-05T10:00:00Z"}, now=NOW),
            parse_outcome({"run_id": "s", "status": "failure", "ts": "2026-11-06T10:00:00Z"}, now=NOW)]
    got = {k: v["status"] for k, v in counted(rows[::-1]).items()}
    assert got == {"r": "success", "s": "failure"}


def test_metrics_arithmetic() -> None:
    m = outcome_metrics(Decimal("10"), 4, 4000, 30, Decimal("1"), Decimal("4"), Decimal("100"),
                        human_baseline(Decimal(8), Decimal(24)))
    assert m["cost_per_outcome_usd"] == "2.5" and m["calls_per_outcome"] == 7.5 and m["tokens_per_outcome"] == 1000
    assert m["baseline_cost_per_outcome_usd"] == "3.2" and m["saving_per_outcome_usd"] == "0.7"
    assert m["saving_usd"] == "2.8" and m["roi"] == 0.28 and m["value_roi"] == 9.0
    none = outcome_metrics(Decimal("3"), 0, 10, 2, baseline=Baseline(Decimal(1), "x"))
    assert none["cost_per_outcome_usd"] is None and none["saving_usd"] is None


def test_cost_per_outcome_is_the_ledger_sum_over_successes_exactly(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/l.db"
    rows, outs = build_ledger(url)
    wh = Warehouse(url)
    wh.refresh_blocking()
    latest = counted(outs)
    by_wf = {r["workflow"]: r for r in cost_per_outcome(wh, Filter(since=T0, until=NOW),
                                                       {"triage": Baseline(Decimal("3.20"), "human L1")})}
    for wf in ("triage", "kyc", "contracts"):
        runs = {r["run_id"] for r in rows if r["run_id"] and r["workflow"] == wf}
        ledger_sum = sum((Decimal(r["cost_usd"]) for r in rows if r["run_id"] in runs), Decimal(0))
        successes = sum(1 for run in runs if run in latest and latest[run]["status"] == "success")
        got = by_wf[wf]
        assert Decimal(got["cost_per_outcome_usd"]) == ledger_sum / successes  # exact, failed runs included
        assert got["runs"] == len(runs) and got["successes"] == successes
        assert got["unreported"] == sum(1 for run in runs if run not in latest)
        calls = sum(1 for r in rows if r["run_id"] in runs)
        assert got["calls_per_outcome"] == round(calls / successes, 2)
        costs = sorted(sum((Decimal(r["cost_usd"]) for r in rows if r["run_id"] == run), Decimal(0)) for run in runs)
        assert Decimal(got["p50_run_cost_usd"]) == costs[(len(costs) + 1) // 2 - 1]
    t = by_wf["triage"]
    assert Decimal(t["saving_usd"]) == Decimal("3.20") * t["successes"] - Decimal(t["spend_usd"])
    assert t["roi"] == round(float(Decimal(t["saving_usd"]) / Decimal(t["spend_usd"])), 4)
    multipliers = {r["workflow"]: r for r in agentic_multiplier(wh, Filter(since=T0, until=NOW))}
    assert multipliers["kyc"]["calls_per_run"] > 1
    trend = outcome_trend(wh, Filter(since=T0, until=NOW), "week", "kyc")
    assert sum(r["successes"] for r in trend) == by_wf["kyc"]["successes"]
    wh.close()


def test_period_baseline_is_margins_own_earlier_cost(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/l.db"
    build_ledger(url)
    wh = Warehouse(url)
    wh.refresh_blocking()
    first = Filter(since=T0, until=T0 + timedelta(days=10))
    second = Filter(since=T0 + timedelta(days=10), until=NOW)
    before = {r["workflow"]: r for r in cost_per_outcome(wh, first)}
    now_rows = cost_per_outcome(wh, second, period_baselines={"kyc": (first.since, first.until, "first 10 days")})
    kyc = next(r for r in now_rows if r["workflow"] == "kyc")
    assert kyc["baseline"] == "first 10 days"
    assert kyc["baseline_cost_per_outcome_usd"] == before["kyc"]["cost_per_outcome_usd"]
    wh.close()
