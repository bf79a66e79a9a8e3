"""Rows derived from each event's `actions` when it is copied, so pages never parse that JSON per
query: money saved per lever (`savings`) and the downgrades, blocks and deferrals each budget
caused (`budget_acts`). Both carry the event's ts_start and team, so a page filters them by time
and team without touching events (parsing `actions` over a month of events cost 35 ms at 1M)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import orjson

Row = dict[str, Any]
MONEY = "DECIMAL(38, 24)"
BUDGET_ACTIONS = ("downgrade", "block", "defer")

DDL = (
    # Money saved per lever, one row per (event, lever), from the event's `actions` "saved" entries.
    f"CREATE TABLE IF NOT EXISTS savings (event_id VARCHAR, lever VARCHAR, usd {MONEY}, tokens BIGINT, "
    "ts_start TIMESTAMP, team VARCHAR, PRIMARY KEY (event_id, lever))",
    # One row per budget named by a downgrade / block / defer entry (n: the entry, j: the budget in it).
    "CREATE TABLE IF NOT EXISTS budget_acts (event_id VARCHAR, n INTEGER, j INTEGER, budget VARCHAR, "
    "action VARCHAR, ts_start TIMESTAMP, team VARCHAR, PRIMARY KEY (event_id, n, j))",
)
# (table, column names of the registered rows, the SELECT of their values); ts_start and team come
# from the event just copied; `?, ?` bound the events scanned like refresh's de-duplication does.
INSERTS = {
    "savings": (("e", "l", "u", "t"), f"s.e, s.l, CAST(s.u AS {MONEY}), CAST(s.t AS BIGINT)"),
    "budget_acts": (("e", "n", "j", "b", "a"), "s.e, CAST(s.n AS INTEGER), CAST(s.j AS INTEGER), s.b, s.a"),
}


def insert_sql(table: str) -> str:
    return (f"INSERT INTO {table} SELECT {INSERTS[table][1]}, e.ts_start, e.team FROM derived s "
            "JOIN events e ON e.event_id = s.e WHERE e.event_id >= ? AND e.ts_start >= ? ON CONFLICT DO NOTHING")


def _entries(actions: Any) -> list[Any]:
    out = orjson.loads(actions) if isinstance(actions, str) else actions
    return out if isinstance(out, list) else []


def savings_of(row: Row) -> list[tuple[str, str, str, int]]:
    """(event_id, lever, usd, tokens) per lever an event saved money with. Levers append
    `{"action": "saved", "lever", "usd", "tokens"}` to `actions`; older events (cache hits) only
    have `lever` / `avoided_cost_usd` / `tokens_saved`."""
    actions = row.get("actions")
    out: dict[str, tuple[str, str, str, int]] = {}
    if actions and '"saved"' in actions:
        for a in _entries(actions):
            if isinstance(a, dict) and a.get("action") == "saved" and a.get("lever"):
                lever = str(a["lever"])
                prev = out.get(lever)
                usd_ = Decimal(str(a.get("usd") or 0)) + (Decimal(prev[2]) if prev else 0)
                tokens = int(a.get("tokens") or 0) + (prev[3] if prev else 0)
                out[lever] = (row["event_id"], lever, format(usd_, "f"), tokens)
    if not out and row.get("lever"):
        levers = [x.strip() for x in str(row["lever"]).split(",") if x.strip()]
        if levers:  # several levers but no breakdown: credit the first (documented)
            out[levers[0]] = (row["event_id"], levers[0], str(row.get("avoided_cost_usd") or "0"),
                              int(row.get("tokens_saved") or 0))
    return list(out.values())



def budget_acts_of(row: Row) -> list[tuple[str, int, int, str, str]]:
    """(event_id, entry, position, budget, action) per budget a downgrade / block / defer entry of the
    event names (`budgets`, or the older single `budget`)."""
    actions = row.get("actions")
    if not actions or not any(f'"{k}"' in actions for k in BUDGET_ACTIONS):
        return []
    out = []
    for n, a in enumerate(_entries(actions)):
        if isinstance(a, dict) and a.get("action") in BUDGET_ACTIONS:
            listed = a.get("budgets")
            names: list[Any] = listed if isinstance(listed, list) else [a.get("budget")]
            out += [(row["event_id"], n, j, str(b), str(a["action"])) for j, b in enumerate(names) if b is not None]
    return out
