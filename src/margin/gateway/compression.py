"""The compression lever in the request path: apply the route's policy (pure, policy/compress.py)
to the prompt about to be sent, optionally with a summary of what was dropped, and record what it
saved. Runs after the cache lookup, so the cache is keyed on the original request."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from margin import wiring
from margin.config import CompressConfig
from margin.domain import Call, Event, RouteDecision
from margin.gateway import levers
from margin.policy import compress
from margin.pricing import PriceBook
from margin.pricing.tokens import count_messages

Summarise = Callable[[CompressConfig, list[dict[str, Any]], Call, Event], Awaitable[str]]


class CompressLever:
    def __init__(self, settings: dict[str, CompressConfig], prices: PriceBook, summarise: Summarise):
        self.settings, self.prices, self.summarise = settings, prices, summarise
        self.policies = {name: wiring.compress_policy(c) for name, c in settings.items()}

    @property
    def routes(self) -> frozenset[str]:
        return frozenset(self.settings)

    async def apply(self, call: Call, decision: RouteDecision, payload: dict[str, Any],
                    upstream_payload: dict[str, Any], ev: Event) -> None:
        """Send a smaller prompt; the tokens saved are priced at the served model's input rate."""
        settings = self.settings[call.requested_model]
        c = compress.compress(payload["messages"], self.policies[call.requested_model], count_messages)
        messages = c.messages
        if c.dropped and settings.summarise_with:
            summary = await self.summarise(settings, c.dropped, call, ev)
            if summary:
                messages = compress.with_summary(c, summary)
                c.notes.append(f"summarised by {settings.summarise_with}")
        if not c.notes:
            return
        after = count_messages(messages)
        ev.actions.append({"action": "compress", "tokens_before": c.tokens_before, "tokens_after": after,
                           "notes": c.notes})
        if after < c.tokens_before:
            upstream_payload["messages"] = messages
            rate = self.prices.rates(decision.model).input.at(c.tokens_before)
            levers.saved(ev, "compression", (c.tokens_before - after) * rate / 1_000_000, c.tokens_before - after)
