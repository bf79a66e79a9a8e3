"""What budgets and run caps did, from the `actions` the gateway records on each event (every
replica's, unlike a gateway's in-memory list of notifications it sent): downgrades, blocks and
deferrals per budget (derived.budget_acts_of), and the runs a run cap stopped. The dashboard's
budget alerts, the budgets page and the routing page read these; each takes a `Filter`, whose
team restriction is in the SQL."""

from __future__ import annotations

from datetime import datetime

from margin.analytics.filters import Filter
from margin.analytics.queries import Rows
from margin.analytics.warehouse import Warehouse, utc_naive


def budget_actions(wh: Warehouse, f: Filter, since: datetime,
                   budgets: dict[str, datetime] | None = None) -> Rows:
    """Downgrades, blocks and deferrals per (budget, action) since `since` (`f`'s team only): count
    and the latest time, newest first. With `budgets` (id -> its period start), only those budgets,
    each counted from its own start. Read from the `budget_acts` rows the warehouse derived from
    each event's `actions` when it copied it."""
    where, params = Filter(since=since, team=f.team).sql("a")
    join = ""
    if budgets is not None:
        if not budgets:
            return []
        join = (f" JOIN (VALUES {', '.join('(?, ?)' for _ in budgets)}) AS s(budget, since) "
                "ON a.budget = s.budget AND a.ts_start >= s.since")
        params = [x for b, t in budgets.items() for x in (b, utc_naive(t))] + params
    rows = wh.query(
        f"SELECT a.budget, a.action, count(*) AS count, max(a.ts_start) AS last FROM budget_acts a{join} "
        f"WHERE {where} GROUP BY 1, 2 ORDER BY last DESC, 1, 2", params)
    for x in rows:
        x["last"] = x["last"].isoformat(timespec="seconds")
    return rows


def cap_hits(wh: Warehouse, f: Filter, limit: int = 25) -> Rows:
    """Runs stopped by a run cap, with the caps and limits that hit, newest first."""
    where, params = f.sql()
    rows = wh.query(
        "SELECT run_id, max(workflow) AS workflow, max(team) AS team, count(*) AS refused, max(ts_start) AS last, "
        "string_agg(DISTINCT regexp_extract(actions, '\"cap\":\\s*\"([^\"]+)\"', 1), ', ') AS caps, "
        "string_agg(DISTINCT regexp_extract(actions, '\"limit\":\\s*\"([^\"]+)\"', 1), ', ') AS limits "
        f"FROM events WHERE {where} AND error_type = 'run_limit_exceeded' AND run_id IS NOT NULL "
        "GROUP BY run_id ORDER BY last DESC LIMIT ?", [*params, limit])
    for x in rows:
        x["last"] = x["last"].isoformat(timespec="seconds") if x["last"] else ""
    return rows
