"""What a replay did to every request (per-request arrays), the per-budget log, and the
exact-cache step shared by the vectorised and the budgeted paths."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from margin.domain import Call
from margin.domain.budget import CounterState
from margin.policy import cache as cache_policy
from margin.replay.levers import ExactCache, Routed
from margin.replay.policy import Policy
from margin.replay.traces import Trace

# Per-request outcome codes.
SERVED, CACHE_HIT, BLOCKED, RATE_LIMITED, REFUSED, DEFERRED = 0, 1, 2, 3, 4, 5
Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass
class BudgetLog:
    blocks: int = 0
    defers: int = 0
    downgrades: int = 0
    truncations: int = 0
    notifies: int = 0
    first: dict[str, str] = field(default_factory=dict)  # action -> first time it happened (ISO)

    def hit(self, action: str, when: datetime) -> None:
        setattr(self, action, getattr(self, action) + 1)
        self.first.setdefault(action, when.isoformat())


@dataclass
class Outcome:
    """What happened to every request (arrays of the trace's length) and how the policy was run."""

    policy: Policy
    trace: Trace
    start: datetime
    models: list[str]
    calls: list[Call]
    combo: np.ndarray
    routed: Routed
    reference: np.ndarray  # model index a request costs without routing (-1: none)
    chosen: np.ndarray  # model index after routing (or the forced candidate), before budgets
    served: np.ndarray
    status: np.ndarray
    lane: np.ndarray
    input_tokens: np.ndarray
    cached: np.ndarray
    output: np.ndarray  # after any budget cap
    truncated: np.ndarray
    downgraded: np.ndarray
    budgets: dict[str, BudgetLog] = field(default_factory=dict)
    counters: dict[str, tuple[CounterState, str]] = field(default_factory=dict)  # key -> (state, budget id)
    notes: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0


def exact_key(o: Outcome, keys: list[tuple[dict[str, Any], str]] | None, i: int, model: int) -> str | None:
    if keys is None or not keys[i][0]:
        return None
    payload, tenant = keys[i]
    if not cache_policy.cacheable(payload, o.policy.cfg.cache.allow_nondeterministic):
        return None
    return cache_policy.cache_key("chat", o.models[model], payload, tenant)


def exact_one(o: Outcome, keys: list[tuple[dict[str, Any], str]] | None, cache: ExactCache, i: int,
               now: float) -> bool:
    key = exact_key(o, keys, i, int(o.served[i]))
    if key is None:
        return False
    if cache.get(key, now) is not None:  # served from the cache: the request's own cost is avoided
        o.status[i] = CACHE_HIT
        return True
    cache.put(key, True, now)
    return False
