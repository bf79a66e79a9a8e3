"""Anomalies: a day's spend (per budget scope) or calls per run (per workflow) far outside the
forecast interval. Each anomaly fires the matching budget's webhook once per budget and day,
across replicas and restarts: the claim is a row in the ledger's `alerts` table.

One fit per series on the history up to the day before yesterday, forecasting yesterday and
today: yesterday (complete) is anomalous above or below the interval, today (still running) only
when what it has spent so far already exceeds the whole day's upper bound."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx
import numpy as np
import orjson

from margin.analytics.filters import Filter
from margin.analytics.forecast import forecast
from margin.analytics.warehouse import Warehouse
from margin.domain.budget import Budget
from margin.ledger.store import Store

log = logging.getLogger("margin.anomaly")
HISTORY_DAYS = 56
LEVEL = 0.99  # "far outside": a 99% interval, so a normal week does not page anyone


@dataclass(frozen=True)
class Anomaly:
    subject: str  # "budget" or "workflow"
    id: str
    metric: str  # "spend_usd", "tokens" or "calls_per_run"
    day: str
    actual: float
    expected: float
    lower: float
    upper: float
    direction: str  # "high" or "low"
    partial_day: bool
    model: str


def budget_filter(b: Budget, team: str | None = None) -> Filter:
    """The events a budget counts ("*" scope values: every value together)."""
    where = tuple((("key_id" if d == "key" else d), v) for d, v in b.scope if v != "*")
    return Filter(team=team, where=where)


def daily_totals(wh: Warehouse, f: Filter, first: date, last: date, metric: str = "usd") -> np.ndarray:
    """Per UTC day from `first` to `last` inclusive, zero-filled: spend (USD) or tokens."""
    value = "sum(cost_usd)" if metric == "usd" else "sum(coalesce(input_tokens, 0) + coalesce(output_tokens, 0))"
    g = Filter(since=datetime.combine(first, datetime.min.time(), UTC),
               until=datetime.combine(last + timedelta(days=1), datetime.min.time(), UTC), team=f.team, where=f.where)
    where, params = g.sql()
    rows = wh.query(f"SELECT CAST(date_trunc('day', ts_start) AS DATE) AS d, {value} AS v FROM events "
                    f"WHERE {where} GROUP BY 1", params)
    out = np.zeros((last - first).days + 1)
    for r in rows:
        out[(r["d"] - first).days] = float(r["v"] or 0)
    return out


def calls_per_run(wh: Warehouse, workflow: str, first: date, last: date, team: str | None = None) -> np.ndarray:
    """Mean LLM calls per run started each day (NaN on days without runs)."""
    f = Filter(since=datetime.combine(first, datetime.min.time(), UTC),
               until=datetime.combine(last + timedelta(days=1), datetime.min.time(), UTC), team=team)
    where, params = f.sql(time=False)
    rows = wh.query(
        "SELECT CAST(date_trunc('day', s) AS DATE) AS d, avg(n) AS v FROM (SELECT run_id, min(ts_start) AS s, "
        f"count(*) AS n, max(workflow) AS wf FROM events WHERE run_id IS NOT NULL AND {where} GROUP BY run_id) "
        "WHERE wf = ? AND s >= ? AND s < ? GROUP BY 1", [*params, workflow, *f.range_params()])
    out = np.full((last - first).days + 1, np.nan)
    for r in rows:
        out[(r["d"] - first).days] = float(r["v"])
    return out


def _judge(subject: str, ident: str, metric: str, history: np.ndarray, yesterday: float, today: float | None,
           day0: date, level: float) -> list[Anomaly]:
    hist = history[~np.isnan(history)] if metric == "calls_per_run" else history
    if len(hist) < 14 or not np.any(hist):
        return []  # too little to know what normal is
    fc = forecast(hist, day0, 2, level)
    out = []
    checks: list[tuple[int, float, bool]] = [(0, yesterday, False)]
    if today is not None:
        checks.append((1, today, True))
    for i, actual, partial in checks:
        if np.isnan(actual):
            continue
        lo, hi = float(fc.lower[i]), float(fc.upper[i])
        direction = "high" if actual > hi else ("low" if actual < lo and not partial else "")
        if direction:
            out.append(Anomaly(subject, ident, metric, (day0 + timedelta(days=i)).isoformat(), round(actual, 6),
                               round(float(fc.mean[i]), 6), round(lo, 6), round(hi, 6), direction, partial,
                               fc.model))
    return out


def detect(wh: Warehouse, budgets: Sequence[Budget], workflows: Sequence[str], now: datetime,
           history_days: int = HISTORY_DAYS, level: float = LEVEL) -> list[Anomaly]:
    today = now.astimezone(UTC).date()
    yesterday = today - timedelta(days=1)
    first = yesterday - timedelta(days=history_days)
    found: list[Anomaly] = []
    for b in budgets:
        metric = "usd" if b.unit == "usd" else "tokens"
        series = daily_totals(wh, budget_filter(b), first, today, metric)
        # Today so far: only up to `now`, so a test (or a replay) at a given time sees that time.
        so_far = daily_totals_until(wh, budget_filter(b), today, now, metric)
        found += _judge("budget", b.id, "spend_usd" if metric == "usd" else "tokens", series[:-2],
                        float(series[-2]), so_far, yesterday, level)
    for wf in workflows:
        series = calls_per_run(wh, wf, first, yesterday)
        found += _judge("workflow", wf, "calls_per_run", series[:-1], float(series[-1]), None, yesterday, level)
    return found


def daily_totals_until(wh: Warehouse, f: Filter, day: date, now: datetime, metric: str) -> float:
    value = "sum(cost_usd)" if metric == "usd" else "sum(coalesce(input_tokens, 0) + coalesce(output_tokens, 0))"
    g = Filter(since=datetime.combine(day, datetime.min.time(), UTC), until=now, team=f.team, where=f.where)
    where, params = g.sql()
    r = wh.query(f"SELECT {value} AS v FROM events WHERE {where}", params)
    return float(r[0]["v"] or 0) if r else 0.0


def post_json(url: str, payload: dict[str, Any]) -> bool:
    try:
        r = httpx.post(url, content=orjson.dumps(payload), headers={"Content-Type": "application/json"}, timeout=5)
    except httpx.HTTPError as e:
        log.warning("anomaly webhook %s failed: %s", url, e)
        return False
    if r.status_code >= 400:
        log.warning("anomaly webhook %s answered HTTP %s", url, r.status_code)
    return r.status_code < 400


async def check(wh: Warehouse, store: Store, budgets: Sequence[Budget], now: datetime,
                workflows: Sequence[str] = (), notify: bool = True, history_days: int = HISTORY_DAYS,
                level: float = LEVEL, post: Callable[[str, dict[str, Any]], bool] = post_json) -> list[dict[str, Any]]:
    """Refresh the warehouse, detect anomalies and (with `notify`) fire each matching budget's
    webhook once per budget and day. What the gateway runs periodically and `margin forecast
    anomalies` runs once. Returns one row per anomaly and budget, with `notified` true only where
    this call fired the webhook."""
    import asyncio

    await wh.refresh(store)
    found = await asyncio.to_thread(detect, wh, budgets, workflows, now, history_days, level)
    out = []
    for a in found:
        targets: list[Budget | None] = [b for b in budgets if b.id == a.id] if a.subject == "budget" else [
            b for b in budgets if dict(b.scope).get("workflow") in (a.id, "*")]
        for b in targets or [None]:
            row: dict[str, Any] = {**asdict(a), "budget": b.id if b else None, "notified": False}
            if notify and b is not None:
                payload = {"event": "budget.anomaly", "budget": b.id, "name": b.label, "scope": dict(b.scope),
                           **asdict(a), "level": level, "at": now.isoformat()}
                claimed = await store.claim_alert(f"anomaly:{b.id}:{a.day}", "anomaly",
                                                  orjson.dumps(payload).decode(), now)
                if claimed:
                    log.warning("anomaly: %s %s %s on %s = %s outside [%s, %s]", a.subject, a.id, a.metric, a.day,
                                a.actual, a.lower, a.upper)
                    row["notified"] = True
                    if b.webhook:
                        row["delivered"] = await asyncio.to_thread(post, b.webhook, payload)
            out.append(row)
    return out
