"""What each efficiency lever saved on one call, recorded on its ledger event, so reports can show
money saved per lever (issue 6: "cost by lever").

Every saving is an entry in `event.actions`: {"action": "saved", "lever", "usd", "tokens"}; the
event's `avoided_cost_usd` is their sum and `lever` their comma-joined names. A saving is priced on
the call's own usage at the counterfactual model's rates (what the same tokens would have cost
there), so routing + downgrade add up to "reference model - model served". A cascade step whose
answer was rejected saves a negative amount: its cost was the price of trying the cheap model."""

from __future__ import annotations

from decimal import Decimal

from margin.domain import Event, usd
from margin.pricing import PriceBook


def saved(ev: Event, lever: str, amount: Decimal, tokens: int = 0) -> None:
    ev.actions.append({"action": "saved", "lever": lever, "usd": usd(amount), "tokens": tokens})
    ev.avoided_cost_usd += amount
    ev.tokens_saved += tokens
    if lever not in ev.lever.split(","):
        ev.lever = f"{ev.lever},{lever}" if ev.lever else lever


def account_route(ev: Event, prices: PriceBook, reference: str | None) -> None:
    """Routing and budget-downgrade savings of a metered call. `reference`: the model a routed
    group's savings are measured against (None for a request of a concrete model)."""
    if ev.status != 200 or not ev.model or ev.cache_hit:
        return
    cost = ev.cost.total_usd
    if any(a.get("action") == "cascade_escalate" for a in ev.actions):
        saved(ev, "routing", -cost)
        return
    routed = ev.model
    down = next((a for a in ev.actions if a.get("action") == "downgrade"), None)
    if down is not None and down.get("from") in prices.models:
        routed = str(down["from"])
        saved(ev, "downgrade", prices.cost(routed, ev.usage).total_usd - cost)
    if reference is not None and reference != routed and reference in prices.models:
        saved(ev, "routing", prices.cost(reference, ev.usage).total_usd - prices.cost(routed, ev.usage).total_usd)
