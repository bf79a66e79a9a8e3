"""`/admin/budgets`: list with live status, create or replace, delete. Changes reach this replica
at once and the others at their next refresh (budget_refresh_s)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import orjson
from pydantic import ValidationError

from margin.config import BudgetConfig
from margin.domain import usd
from margin.domain.budget import CounterState, Hold, from_units, to_units
from margin.gateway import audit
from margin.gateway.errors import BadRequest, MethodNotAllowed, NotFound
from margin.gateway.pipeline import JSON_HEADERS, Headers
from margin.policy import budget as policy

if TYPE_CHECKING:
    from margin.gateway.app import MarginApp


async def reload(app: MarginApp) -> None:
    stored, deleted = [], set()
    for r in await app.store.list_budgets():
        if r["body"] is None:
            deleted.add(r["id"])
        else:
            stored.append(BudgetConfig.model_validate_json(r["body"]))
    app.guard.load(stored, deleted)


def forecast(spent: Decimal, limit: Decimal, start: datetime, end: datetime, now: datetime) -> str | None:
    """Linear burn: when the limit is reached if spend continues at this period's average rate."""
    elapsed = (now - start).total_seconds()
    if spent <= 0 or elapsed <= 0:
        return None
    at = start.timestamp() + float(limit / spent) * elapsed
    return datetime.fromtimestamp(at, UTC).isoformat() if at < end.timestamp() else None


async def status(app: MarginApp, budget_id: str) -> dict[str, Any]:
    g = app.guard
    cfg = g.definitions[budget_id]
    b = next(x for x in g.budgets if x.id == budget_id)
    now = datetime.now(UTC)
    start, end = policy.window(b, now)
    # Counters this replica has seen, plus the one an exact scope names even before any traffic.
    keys = {k for k in g.snapshot if k.startswith(f"b:{b.id}:")}
    exact = dict(b.scope)
    if "*" not in exact.values():
        keys |= {a.key for a in policy.applicable([b], exact, now)}
    holds = [Hold(k, "budget", to_units(b.limit, b.unit), 0, end.timestamp() + policy.COUNTER_SLACK_S,
                  float(b.rolling_s) if b.period == "rolling" else 0.0, b.unit) for k in sorted(keys)]
    states = await g.state.snapshot(holds, now.timestamp()) if holds else {}
    counters = []
    for h in holds:
        st = states.get(h.key, CounterState())
        spent, reserved = from_units(st.spent, b.unit), from_units(st.reserved, b.unit)
        fmt = usd if b.unit == "usd" else str
        counters.append({
            "counter": h.key, "scope": h.key.split(":")[2], "spent": fmt(spent), "reserved": fmt(reserved),
            "remaining": fmt(max(Decimal(0), b.limit - spent - reserved)),
            "used_pct": round(float((spent + reserved) / b.limit * 100), 2),
            "forecast_exhausted_at": forecast(spent, b.limit, start, end, now),
        })
    return {**orjson.loads(cfg.model_dump_json()), "source": "config" if budget_id in g.config_budgets
            and budget_id not in g.stored_ids else "admin", "period_start": start.isoformat(),
            "period_end": end.isoformat(), "counters": counters,
            "fired": [f for f in g.fired if f["budget"] == budget_id][-20:]}


async def handle(app: MarginApp, method: str, parts: list[str], body: bytes,
                 who: audit.Who | None = None) -> tuple[int, Headers, bytes]:
    """parts: ["admin", "budgets", id?]."""
    budget_id = parts[2] if len(parts) == 3 else None
    if budget_id is None and method == "GET":
        data = [await status(app, b) for b in sorted(app.guard.definitions)]
        return 200, JSON_HEADERS, orjson.dumps({"object": "list", "data": data})
    if method in ("POST", "PUT"):
        try:
            cfg = BudgetConfig.model_validate_json(body or b"{}")
        except ValidationError as e:
            msg = "; ".join(f"{'.'.join(str(x) for x in err['loc']) or 'budget'}: {err['msg']}" for err in e.errors())
            raise BadRequest(f"Invalid budget: {msg}", code="invalid_budget") from None
        if budget_id is not None and cfg.id != budget_id:
            raise BadRequest(f"Body id {cfg.id!r} does not match the path {budget_id!r}", code="invalid_budget")
        models = {m for t in cfg.thresholds for pair in t.map.items() for m in pair if "*" not in m}
        unknown = sorted(models - set(app.targets))
        if unknown:
            raise BadRequest(f"Downgrade map names unknown model(s): {', '.join(unknown)}", code="invalid_budget")
        before = await audit.budget_before(app, cfg.id)  # audit (issue 11)
        await app.store.put_budget(cfg.id, cfg.model_dump_json(), datetime.now(UTC))
        await audit.record(app, who, "budget.create" if before is None else "budget.update", cfg.id, before,
                           orjson.loads(cfg.model_dump_json()))
        await reload(app)
        return 200, JSON_HEADERS, orjson.dumps(await status(app, cfg.id))
    if budget_id is None:
        raise MethodNotAllowed("/admin/budgets takes GET, POST or PUT")
    if budget_id not in app.guard.definitions:
        raise NotFound(f"No budget with id {budget_id}", code="budget_not_found")
    if method == "GET":
        return 200, JSON_HEADERS, orjson.dumps(await status(app, budget_id))
    if method == "DELETE":
        before = await audit.budget_before(app, budget_id)  # audit (issue 11)
        await app.store.put_budget(budget_id, None, datetime.now(UTC))
        await audit.record(app, who, "budget.delete", budget_id, before, None)
        await reload(app)
        return 200, JSON_HEADERS, orjson.dumps({"id": budget_id, "deleted": True})
    raise MethodNotAllowed(f"/admin/budgets/{budget_id} takes GET, PUT or DELETE")
