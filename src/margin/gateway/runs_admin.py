"""`/admin/runs`: agent runs as the ledger saw them, with the live state of their run caps.
`GET /admin/runs?since=24h&workflow=W&limit=100` lists recent runs (newest first);
`GET /admin/runs/{run_id}` gives one run's steps and, per cap that applies, its counters now."""

from __future__ import annotations

import time
from decimal import Decimal
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import orjson

from margin.analytics.filters import parse_since
from margin.domain import Attribution, usd
from margin.domain.budget import CounterState, Hold, from_units
from margin.gateway.errors import BadRequest, MethodNotAllowed, NotFound
from margin.ledger.schema import Row
from margin.policy import agents
from margin.policy import budget as budget_policy

if TYPE_CHECKING:
    from margin.gateway.app import MarginApp
    from margin.gateway.pipeline import Headers

JSON: list[tuple[bytes, bytes]] = [(b"content-type", b"application/json")]
STEP_FIELDS = ("event_id", "ts_start", "step", "agent", "tool", "requested_model", "model", "status", "error_type",
               "input_tokens", "output_tokens", "tool_calls", "cost_usd", "lever", "parent_event_id")


def summarise(rows: list[Row]) -> dict[str, Any]:
    """One run from its events (oldest first)."""
    first, last = rows[0], rows[-1]
    stops = [a for r in rows for a in orjson.loads(r.get("actions") or "[]") if a.get("action") == "run_stop"]
    return {
        "run_id": first["run_id"], "workflow": next((r["workflow"] for r in rows if r.get("workflow")), None),
        "team": first.get("team"), "key_id": first.get("key_id"),
        "started": first["ts_start"], "last": last["ts_end"],
        "calls": len(rows), "errors": sum(1 for r in rows if int(r.get("status") or 0) >= 400),
        "tool_calls": sum(int(r.get("tool_calls") or 0) for r in rows),
        "tokens": sum(int(r.get("input_tokens") or 0) + int(r.get("output_tokens") or 0) for r in rows),
        "cost_usd": usd(sum((Decimal(str(r.get("cost_usd") or 0)) for r in rows), Decimal(0))),
        "stopped": stops[-1] if stops else None,
    }


async def _caps(app: MarginApp, rows: list[Row]) -> list[dict[str, Any]]:
    """The live counters of every run cap that applies to this run (any replica's spend)."""
    first = rows[0]
    tags = tuple(sorted(orjson.loads(first.get("tags") or "{}").items()))
    attribution = Attribution(first.get("org") or "", first.get("team") or "", first.get("user") or "",
                              first.get("app") or "", first.get("env") or "", first.get("key_id") or "", tags)
    workflow = next((r["workflow"] for r in rows if r.get("workflow")), "")
    dims = budget_policy.dims_of(attribution, workflow, first.get("model") or "", first.get("provider") or "")
    run_id, now = str(first["run_id"]), time.time()
    out = []
    for cap in agents.applicable(app.guard.run_caps, dims, run_id):
        keys = {what: agents.key(cap, what, run_id) for what in ("calls", "tools", "usd")}
        holds = [Hold(k, "budget", 0, 0, now + cap.ttl_s, unit="usd" if what == "usd" else "calls")
                 for what, k in keys.items()]
        state = await app.guard.state.snapshot(holds, now)
        spent = state.get(keys["usd"], CounterState())
        out.append({
            "cap": cap.id, "on_cap": cap.on_cap,
            "calls": {"used": state.get(keys["calls"], CounterState()).spent, "limit": cap.max_calls},
            "tool_calls": {"used": state.get(keys["tools"], CounterState()).spent, "limit": cap.max_tool_calls},
            "usd": {"spent": usd(from_units(spent.spent, "usd").normalize()),
                    "reserved": usd(from_units(spent.reserved, "usd").normalize()),
                    "limit": usd(cap.max_usd) if cap.max_usd is not None else None},
            "max_wall_s": cap.max_wall_s, "max_repeats": cap.max_repeats,
        })
    return out


async def handle(app: MarginApp, method: str, parts: list[str], query: str) -> tuple[int, Headers, bytes]:
    if method != "GET":
        raise MethodNotAllowed("/admin/runs takes GET")
    q = {k: v[-1] for k, v in parse_qs(query).items()}
    if len(parts) == 3:  # one run
        rows = await app.store.fetch_events(run_id=parts[2])
        if not rows:
            raise NotFound(f"No run with id {parts[2]!r} in the ledger", code="run_not_found")
        steps = [{f: r.get(f) for f in STEP_FIELDS} for r in rows]
        return 200, JSON, orjson.dumps({**summarise(rows), "steps": steps, "caps": await _caps(app, rows)})
    try:
        since = parse_since(q.get("since", "24h"))
        limit = max(1, min(1000, int(q.get("limit", "100"))))
    except ValueError as e:
        raise BadRequest(f"Invalid query: {e}", code="invalid_value") from None
    by_run: dict[str, list[Row]] = {}
    for r in await app.store.fetch_events(since=since, runs_only=True):
        by_run.setdefault(str(r["run_id"]), []).append(r)
    runs = [summarise(rows) for rows in by_run.values()]
    if q.get("workflow"):
        runs = [r for r in runs if r["workflow"] == q["workflow"]]
    runs.sort(key=lambda r: str(r["last"]), reverse=True)
    return 200, JSON, orjson.dumps({"object": "list", "since": since.isoformat(), "data": runs[:limit]})
