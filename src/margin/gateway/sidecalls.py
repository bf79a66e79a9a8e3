"""Calls margin makes on a request's behalf - a cascade judge, a compression summary - and the
cascade's verification that may ask the judge. Each side call is a call of its own through the
same attempt path (budgets, the exact cache, metering, the ledger), linked to the request's event
by parent_event_id, so what a lever costs is as visible as what it saves."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from margin.config import CompressConfig
from margin.domain import Call, Event, RouteDecision
from margin.gateway.calls import output_text, prompt_text
from margin.gateway.errors import GatewayError
from margin.gateway.stream import Captured, Out
from margin.policy import cascade, compress, route

log = logging.getLogger("margin.gateway")
Attempt = Callable[[Call, RouteDecision, dict[str, Any], dict[str, str], bytes, Event, float, Out],
                   Awaitable[None]]


class Escalate(Exception):
    """A cascade step's answer failed verification: try the next, stronger model."""


class SideCalls:
    def __init__(self, targets: dict[str, route.Target], attempt: Attempt, follow_up: Callable[[Event], Event],
                 verifiers: dict[str, tuple[Any, dict[str, str]]] | None = None):
        self.targets, self.attempt, self.follow_up = targets, attempt, follow_up
        self.verifiers = verifiers or {}  # group -> (loaded learned verifier, its model names -> ours)

    async def verify(self, group: route.Group, call: Call, payload: dict[str, Any], data: dict[str, Any],
                     ev: Event) -> None:
        """A cascade step's checks, cheapest first; a rejected answer is metered and recorded but
        not returned: the next, stronger model answers instead."""
        text = output_text(data)
        logprobs = cascade.token_logprobs(data) if group.verify_min_logprob is not None else None
        ok, why = cascade.verify(text, group.verify_regex, group.verify_json, group.verify_min_logprob, logprobs)
        learned = self.verifiers.get(group.name)
        if ok and learned is not None and learned[1].get(learned[0].cheap, learned[0].cheap) == ev.model:
            # Trained on this cheap model's answers (about a millisecond of CPU: inline).
            ok, why = learned[0].check(prompt_text(call.endpoint, payload), text)
        if ok and group.verify_judge:
            question = prompt_text(call.endpoint, payload)
            verdict = await self.call(group.verify_judge, cascade.judge_messages(
                question, text, group.judge_instructions), 4, call, ev, f"cascade judge for {ev.event_id}")
            ok, why = cascade.judge_verdict(verdict) if verdict is not None else (False, "judge unavailable")
        if not ok:
            ev.actions.append({"action": "cascade_escalate", "why": why})
            raise Escalate(why)

    async def summarise(self, settings: CompressConfig, dropped: list[dict[str, Any]], call: Call,
                        parent: Event) -> str:
        summary = await self.call(str(settings.summarise_with), compress.summary_request(
            dropped, settings.summary_max_tokens), settings.summary_max_tokens, call, parent,
            f"compression summary for {parent.event_id}")
        return summary or ""

    async def call(self, model: str, messages: list[dict[str, Any]], max_tokens: int, call: Call,
                   parent: Event, reason: str) -> str | None:
        """Temperature 0, so the exact cache answers the same question once. None if it failed."""
        t = self.targets[model]
        body = {"model": model, "temperature": 0, "max_tokens": max_tokens, "messages": messages}
        sub = dataclasses.replace(call, endpoint="chat", requested_model=model, stream=False, max_tokens=max_tokens,
                                  has_tools=False)  # a chat body, whatever the request's endpoint
        decision = RouteDecision(model=model, provider=t.provider, upstream_model=t.upstream_model, reason=reason)
        ev, out = self.follow_up(parent), Captured()
        ev.requested_model, ev.endpoint = model, "chat"
        try:
            await self.attempt(sub, decision, body, {}, orjson.dumps(body), ev, time.perf_counter(), out)
        except GatewayError as e:
            log.warning("%s by %s failed: %s", reason, model, e)
            return None
        return output_text(orjson.loads(out.body)) if out.status == 200 else None
