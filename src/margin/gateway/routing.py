"""Routing in the request path: gather what the pure policy needs (the request's needs, circuit
state, measured latency, a learned router's verdict) and turn its refusals into client errors."""

from __future__ import annotations

import random
from typing import Any

from margin.domain import Call, Event, RouteDecision
from margin.gateway.calls import estimate_input, needed_capabilities, prompt_text
from margin.gateway.errors import BadRequest, Forbidden, GatewayError, NotFound
from margin.gateway.health import Breakers
from margin.policy import learned as learned_policy
from margin.policy import route

_REFUSALS: dict[int, type[GatewayError]] = {400: BadRequest, 403: Forbidden, 404: NotFound}


class Router:
    def __init__(self, targets: dict[str, route.Target], groups: dict[str, route.Group], breakers: Breakers,
                 routers: dict[str, tuple[Any, dict[str, str]]]):
        self.targets, self.groups, self.breakers = targets, groups, breakers
        self.routers = routers  # group -> (loaded learned router, its model names -> ours)
        self.latency: dict[str, float] = {}  # per model, smoothed: time to first token, else whole call

    def observe(self, ev: Event) -> None:
        """Feed least-latency routing with what a successful call took."""
        if ev.status == 200 and ev.model and not ev.cache_hit:
            seen = ev.ttft_ms if ev.ttft_ms is not None else ev.latency_ms
            old = self.latency.get(ev.model)
            self.latency[ev.model] = seen if old is None else 0.8 * old + 0.2 * seen

    def decide(self, call: Call, payload: dict[str, Any], allowed: tuple[str, ...]) -> RouteDecision:
        need = None
        if call.requested_model in self.groups:
            need = route.Need(prompt_tokens=estimate_input(call.endpoint, payload),
                              max_output=call.max_tokens or 0, capabilities=needed_capabilities(payload),
                              tier=call.tier)
        health = route.Health(self.breakers.open_providers(), tuple(self.latency.items()))
        learned = self._learned(call, payload, allowed, health) if call.requested_model in self.routers else None
        decision = route.decide(call, self.targets, allowed, self.groups, need, health, random.random(), learned)
        if isinstance(decision, route.Refusal):
            raise _REFUSALS.get(decision.status, BadRequest)(decision.message, param=decision.param,
                                                             code=decision.code, status=decision.status)
        return decision

    def _learned(self, call: Call, payload: dict[str, Any], allowed: tuple[str, ...],
                 health: route.Health) -> route.Learned | None:
        """Ask the group's trained router which candidate will succeed cheapest (TF-IDF + logistic
        regression: about a millisecond on CPU, so inline)."""
        router, names = self.routers[call.requested_model]
        text = prompt_text(call.endpoint, payload)
        probs = {names.get(m, m): p for m, p in router.predict(text).items()}
        fits = {m for m in probs if m in self.targets and (not allowed or m in allowed)
                and self.targets[m].provider not in health.open_providers}
        # Costs on the scale the operating point was calibrated on (the artefact's own estimate),
        # so a lambda means what it meant in training.
        costs = {names.get(m, m): c for m, c in router.estimate_costs(text).items() if names.get(m, m) in fits}
        if not costs:
            return None
        probs = {m: p for m, p in probs.items() if m in costs}
        chosen = learned_policy.choose_op(probs, costs, router.operating_point)
        op = router.operating_point
        return route.Learned(chosen, learned_policy.reason(
            probs, costs, chosen, lam=op["value"] if op.get("rule") == "lambda" else None,
            threshold=op["value"] if op.get("rule") == "threshold" else None).removeprefix("learned: "))

