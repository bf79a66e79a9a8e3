"""The hourly rollup: spend, requests, errors, cache hits and tokens per (hour, org, team, app, env,
model, provider, workflow), kept by `Warehouse.refresh` and read by the spend queries.

Why: a 30- or 90-day dashboard page summed a million events on every view (0.4-1 s of CPU at 1M
events). The rollup holds one row per hour and dimension values instead of one per call, so the
same sums read ~10-50x fewer rows. Money stays exact: `cost_usd` is a DECIMAL sum, and a DECIMAL
sum of DECIMAL sums is the same number.

Exactness at the edges: a range rarely starts and ends on the hour (the dashboard's windows end at
"now"). `source()` therefore reads whole hours from the rollup and the partial hours at each cut
(range ends, and any instant the query compares with, such as "the same time last month") from
`events`, so every figure equals the one summed from `events` alone (tested). What needs the single
call (latency percentiles, distinct users, user / key / tag dimensions, actions) still reads `events`.

The team restriction is part of the SQL of both scans."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from margin.analytics.filters import BUCKETS, Filter, dim_sql

TABLE = "hourly"
# Low-cardinality dimensions only: adding `user` or `key_id` would make the rollup about as long as
# the events table (one user rarely makes many calls per model and workflow in an hour).
DIMS = ("org", "team", "app", "env", "model", "provider", "workflow")
HOUR = timedelta(hours=1)
MONEY = "DECIMAL(38, 24)"
_MEASURES = (  # (column, type, SQL over events per hour, SQL for one event row)
    ("requests", "BIGINT", "count(*)", "1"),
    ("errors", "BIGINT", "count(*) FILTER (WHERE status >= 400)", "CASE WHEN status >= 400 THEN 1 ELSE 0 END"),
    ("cache_hits", "BIGINT", "count(*) FILTER (WHERE cache_hit IS NOT NULL)",
     "CASE WHEN cache_hit IS NOT NULL THEN 1 ELSE 0 END"),
    ("input_tokens", "BIGINT", "sum(input_tokens)", "input_tokens"),
    ("cached_input_tokens", "BIGINT", "sum(cached_input_tokens)", "cached_input_tokens"),
    ("output_tokens", "BIGINT", "sum(output_tokens)", "output_tokens"),
    ("reasoning_tokens", "BIGINT", "sum(reasoning_tokens)", "reasoning_tokens"),
    ("cost_usd", MONEY, "sum(cost_usd)", "cost_usd"),
    ("energy_j", "DOUBLE", "sum(energy_j)", "energy_j"),
)
MEASURES = tuple(m[0] for m in _MEASURES)

DDL = (f"CREATE TABLE IF NOT EXISTS {TABLE} (hour TIMESTAMP, "
       + ", ".join(f'"{d}" VARCHAR' for d in DIMS) + ", "
       + ", ".join(f"{c} {t}" for c, t, _, _ in _MEASURES) + ")")

# Rebuild the hours that got new rows (registered as `touched(h)`), bounded by [?, ?) so DuckDB's
# zone maps skip the row groups of other days. Idempotent: rows read twice change nothing.
REBUILD = (
    f"DELETE FROM {TABLE} WHERE hour IN (SELECT h FROM touched)",
    f"INSERT INTO {TABLE} SELECT date_trunc('hour', ts_start) AS hour, "
    + ", ".join(f'{dim_sql(d)} AS "{d}"' for d in DIMS) + ", "
    + ", ".join(f"{agg} AS {c}" for c, _, agg, _ in _MEASURES)
    + " FROM events WHERE ts_start >= ? AND ts_start < ? AND date_trunc('hour', ts_start) IN (SELECT h FROM touched) "
    "GROUP BY ALL",
)


def _naive(t: datetime) -> datetime:
    return t.astimezone(UTC).replace(tzinfo=None) if t.tzinfo else t


def _floor(t: datetime) -> datetime:
    return t.replace(minute=0, second=0, microsecond=0)


def covers(f: Filter, dims: Iterable[str] = ()) -> bool:
    """Whether the rollup can answer a query grouping by `dims` under `f`'s filters."""
    return all(d in DIMS for d in dims) and all(d in DIMS for d, _ in f.where)


def edges(f: Filter, cuts: Sequence[datetime] = ()) -> list[datetime]:
    """The hours (naive UTC) that must come from events: those holding a cut that is not on the hour."""
    points = [_naive(t) for t in (f.since, f.until, *cuts) if t is not None]
    return sorted({_floor(t) for t in points if t != _floor(t)})


def _raw(d: str) -> tuple[str, ...]:
    """The event columns a dimension's SQL reads."""
    if d.startswith("tag:"):
        return ("tags",)
    return ("model", "requested_model") if d == "model" else (d,)


def _events_part(f: Filter, dims: Sequence[str], time: str, time_params: list[Any],
                 per_hour: bool) -> tuple[str, list[Any]]:
    where, params = f.sql(time=False)
    params += time_params
    if per_hour and any(d.startswith("tag:") for d in dims) and not any(d in BUCKETS for d in dims):
        # Sum by hour and the raw columns first, then compute the dimensions on those rows: a tag's
        # JSON is parsed once per distinct tag set and hour instead of once per call (5x faster on
        # the synthetic ledger). Plain columns gain nothing from it, so they are grouped once.
        raw = sorted({c for d in dims for c in _raw(d)})
        inner = ", ".join(["date_trunc('hour', ts_start) AS ts", *(f'"{c}"' for c in raw),
                           *(f"{agg} AS {c}" for c, _, agg, _ in _MEASURES)])
        cols = ", ".join(["ts", *(f'{dim_sql(d)} AS "{d}"' for d in dims), *MEASURES])
        return f"SELECT {cols} FROM (SELECT {inner} FROM events WHERE {where} AND {time} GROUP BY ALL) e", params
    cols = ", ".join([f'{dim_sql(d)} AS "{d}"' for d in dims] + [f"{one} AS {c}" for c, _, _, one in _MEASURES])
    return f"SELECT ts_start AS ts, {cols} FROM events WHERE {where} AND {time}", params


def source(f: Filter, dims: Sequence[str] = (), cuts: Sequence[datetime] = (),
           use_rollup: bool = True) -> tuple[str, list[Any]]:
    """A subquery (to use as `FROM (<sql>) s`) with columns `ts`, the `dims`, and the MEASURES, for
    the rows of `f`: whole hours from the rollup, the partial hours at `f`'s ends and at each of
    `cuts` from events. Grouping its rows by `date_trunc(bucket, ts)` (hour or coarser), by the dims,
    or comparing `ts` with one of the cuts, gives exactly what the same query over events gives.
    Without rollup coverage (a dimension or filter it lacks), or `use_rollup=False`, it is all events.
    `ts` may be truncated to the hour (rollup rows, tag sums) unless `cuts` are given: then every row
    from events keeps its instant."""
    if not use_rollup or not covers(f, dims):
        time: list[str] = []
        tp: list[Any] = []
        if f.since is not None:
            time.append("ts_start >= ?")
            tp.append(_naive(f.since))
        if f.until is not None:
            time.append("ts_start < ?")
            tp.append(_naive(f.until))
        return _events_part(f, dims, " AND ".join(time) or "TRUE", tp, not cuts)
    edge = edges(f, cuts)
    conds: list[str] = ["TRUE"]
    params: list[Any] = []
    if f.team is not None:
        conds.append("team = ?")
        params.append(f.team)
    for d, v in f.where:
        conds.append(f'"{d}" = ?')
        params.append(v)
    if f.since is not None:
        conds.append("hour >= ?")
        params.append(_naive(f.since))
    if f.until is not None:  # whole hours only: [hour, hour + 1h) inside the range
        conds.append("hour <= ?")
        params.append(_naive(f.until) - HOUR)
    if edge:
        conds.append(f"hour NOT IN ({', '.join('?' for _ in edge)})")
        params.extend(edge)
    cols = ", ".join([f'"{d}"' for d in dims] + list(MEASURES))
    parts = [f"SELECT hour AS ts, {cols} FROM {TABLE} WHERE {' AND '.join(conds)}"]
    lo, hi = (_naive(f.since) if f.since else None), (_naive(f.until) if f.until else None)
    for h in edge:  # one range per partial hour, so zone maps skip every other row group
        a, b = max(h, lo) if lo else h, min(h + HOUR, hi) if hi else h + HOUR
        sql, p = _events_part(f, dims, "ts_start >= ? AND ts_start < ?", [a, b], not cuts)
        parts.append(sql)
        params.extend(p)
    return " UNION ALL ".join(parts), params
