"""Runs and outcomes over the warehouse: cost per successful outcome by workflow, its trend, the
agentic multiplier, the runs themselves and one run's steps.

A run is every event sharing a `run_id`. Runs are taken by cohort: those whose first call falls in
the filter's range, with all of their calls (also those after the range end), so a run is never
split between periods. A run's workflow is its counted outcome's, else its events'. With a team
restriction only the team's calls are scanned, so only runs with such calls appear."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from margin.analytics.filters import Filter
from margin.analytics.outcomes import Baseline, outcome_metrics, tidy
from margin.analytics.queries import Rows, _money
from margin.analytics.warehouse import Warehouse

_JOIN = ("j AS (SELECT r.*, coalesce(o.workflow, r.ev_workflow, '') AS wf, o.status AS outcome, o.value_usd, "
         "o.quality, o.human_minutes FROM r LEFT JOIN run_outcome o USING (run_id)) ")


def _runs_cte(f: Filter) -> tuple[str, list[Any]]:
    if not f.where:  # the per-run aggregates kept by refresh (a team restriction applies to them too)
        team, tp = ("team = ?", [f.team]) if f.team is not None else ("TRUE", [])
        sql = ("WITH r AS (SELECT run_id, min(started) AS started, max(ended) AS ended, "
               "max(ev_workflow) AS ev_workflow, max(team) AS team, sum(cost) AS cost, sum(calls) AS calls, "
               "sum(tokens) AS tokens, sum(tool_calls) AS tool_calls, sum(caps_hit) AS caps_hit, "
               f"sum(errors) AS errors FROM runs WHERE {team} GROUP BY run_id "
               "HAVING min(started) >= ? AND min(started) < ?), " + _JOIN)
        return sql, [*tp, *f.range_params()]
    where, params = f.sql(time=False)
    sql = (
        "WITH r AS (SELECT run_id, min(ts_start) AS started, max(ts_end) AS ended, max(workflow) AS ev_workflow, "
        "max(team) AS team, sum(cost_usd) AS cost, count(*) AS calls, "
        "sum(coalesce(input_tokens, 0) + coalesce(output_tokens, 0)) AS tokens, "
        "sum(coalesce(tool_calls, 0)) AS tool_calls, "
        "count(*) FILTER (WHERE error_type = 'run_limit_exceeded') AS caps_hit, "
        "count(*) FILTER (WHERE status >= 400) AS errors "
        f"FROM events WHERE run_id IS NOT NULL AND {where} GROUP BY run_id "
        "HAVING min(ts_start) >= ? AND min(ts_start) < ?), " + _JOIN
    )
    return sql, [*params, *f.range_params()]


_PER_WORKFLOW = (
    "SELECT wf AS workflow, count(*) AS runs, count(*) FILTER (WHERE outcome = 'success') AS successes, "
    "count(*) FILTER (WHERE outcome = 'failure') AS failures, "
    "count(*) FILTER (WHERE outcome = 'escalated') AS escalated, "
    "count(*) FILTER (WHERE outcome IS NULL) AS unreported, "
    "sum(cost) AS spend, sum(tokens) AS tokens, sum(calls) AS calls, sum(tool_calls) AS tool_calls, "
    "sum(caps_hit) AS caps_hit, quantile_disc(cost, 0.5) AS p50, quantile_disc(cost, 0.95) AS p95, "
    "sum(value_usd) FILTER (WHERE outcome = 'success') AS value "
)


def _metrics(r: dict[str, Any], baseline: Baseline | None) -> dict[str, Any]:
    runs = int(r["runs"])
    row = {"workflow": r["workflow"], "runs": runs, "successes": int(r["successes"]),
           "failures": int(r["failures"]), "escalated": int(r["escalated"]), "unreported": int(r["unreported"]),
           "success_rate": round(int(r["successes"]) / runs, 4) if runs else 0.0,
           "calls_per_run": round(int(r["calls"]) / runs, 2) if runs else None,
           "tool_calls_per_run": round(int(r["tool_calls"]) / runs, 2) if runs else None,
           "tokens_per_run": round(int(r["tokens"]) / runs, 1) if runs else None,
           "caps_hit": int(r["caps_hit"])}
    row.update(outcome_metrics(
        tidy(r["spend"]), int(r["successes"]), int(r["tokens"]), int(r["calls"]),
        tidy(r["p50"]) if r["p50"] is not None else None, tidy(r["p95"]) if r["p95"] is not None else None,
        tidy(r["value"]) if r["value"] is not None else None, baseline))
    return row


def cost_per_outcome(wh: Warehouse, f: Filter, baselines: dict[str, Baseline] | None = None,
                     period_baselines: dict[str, tuple[datetime, datetime, str]] | None = None) -> Rows:
    """Per workflow: runs, successes, spend, exact cost per successful outcome, tokens and calls per
    outcome (the agentic multiplier), p50/p95 run cost, value, and saving/ROI against a baseline.
    `period_baselines` maps a workflow to (start, end, label): margin's own cost per outcome then."""
    cte, params = _runs_cte(f)
    rows = wh.query(f"{cte}{_PER_WORKFLOW} FROM j GROUP BY 1 ORDER BY spend DESC, 1", params)
    resolved = dict(baselines or {})
    for wf, (start, end, label) in (period_baselines or {}).items():
        past = cost_per_outcome(wh, Filter(since=start, until=end, team=f.team, where=f.where))
        hit = next((p for p in past if p["workflow"] == wf and p["cost_per_outcome_usd"] is not None), None)
        if hit is not None:
            resolved[wf] = Baseline(Decimal(hit["cost_per_outcome_usd"]), label)
    return [_metrics(r, resolved.get(r["workflow"])) for r in rows]


def outcome_trend(wh: Warehouse, f: Filter, bucket: str = "day", workflow: str | None = None) -> Rows:
    """Cost per successful outcome per period of run start, per workflow."""
    if bucket not in ("day", "week", "month"):
        raise ValueError(f"bucket {bucket!r}: use day, week or month")
    cte, params = _runs_cte(f)
    cond = "WHERE wf = ?" if workflow is not None else ""
    rows = wh.query(
        f"{cte}SELECT date_trunc('{bucket}', started) AS bucket, wf AS workflow, count(*) AS runs, "
        "count(*) FILTER (WHERE outcome = 'success') AS successes, sum(cost) AS spend "
        f"FROM j {cond} GROUP BY 1, 2 ORDER BY 1, 2", [*params, *([workflow] if workflow is not None else [])])
    out = []
    for r in rows:
        spend, ok = tidy(r["spend"]), int(r["successes"])
        out.append({"bucket": r["bucket"].date().isoformat(), "workflow": r["workflow"], "runs": int(r["runs"]),
                    "successes": ok, "spend_usd": spend,
                    "cost_per_outcome_usd": (spend / ok) if ok else None})
    return _money(out)


def agentic_multiplier(wh: Warehouse, f: Filter) -> Rows:
    """How many LLM calls, tool calls and tokens one run (and one successful outcome) takes."""
    return [{k: r[k] for k in ("workflow", "runs", "successes", "calls_per_run", "tool_calls_per_run",
                               "tokens_per_run", "calls_per_outcome", "tokens_per_outcome")}
            for r in cost_per_outcome(wh, f)]


def runs(wh: Warehouse, f: Filter, workflow: str | None = None, limit: int = 100, order: str = "cost") -> Rows:
    """Runs with their cost, calls, tool calls, tokens, errors, caps hit, duration and outcome."""
    orders = {"cost": "cost DESC", "recent": "started DESC", "calls": "calls DESC"}
    if order not in orders:
        raise ValueError(f"order {order!r}: use cost, recent or calls")
    cte, params = _runs_cte(f)
    cond = "WHERE wf = ?" if workflow is not None else ""
    rows = wh.query(
        f"{cte}SELECT run_id, wf AS workflow, team, started, ended, "
        "round(epoch(ended - started), 3) AS duration_s, calls, tool_calls, tokens, errors, caps_hit, "
        f"cost AS cost_usd, coalesce(outcome, '') AS outcome, value_usd FROM j {cond} "
        f"ORDER BY {orders[order]}, run_id LIMIT ?", [*params, *([workflow] if workflow is not None else []), limit])
    for r in rows:
        r["tokens"] = int(r["tokens"] or 0)
    return _money(rows)


def run_steps(wh: Warehouse, run_id: str, f: Filter | None = None) -> Rows:
    """One run's calls in order (within the team restriction, if any)."""
    g = Filter(team=f.team if f else None)
    where, params = g.sql(time=False)
    rows = wh.query(
        "SELECT ts_start, step, agent, tool, coalesce(model, '') AS model, requested_model, route_reason, status, "
        "error_type, input_tokens, output_tokens, cost_usd, latency_ms, cache_hit, actions, event_id "
        f"FROM events WHERE run_id = ? AND {where} ORDER BY ts_start, event_id", [run_id, *params])
    return _money(rows)
