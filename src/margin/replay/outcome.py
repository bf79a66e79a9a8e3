"""What a replay did to every request (per-request arrays), the calls a request made beyond its
first (cascade escalations, compression summaries), the per-budget and per-run-cap logs, and the
exact-cache step shared by the vectorised and the sequential paths."""

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

# Per-request (and per extra call) outcome codes. REFUSED: routing refused; RUN_STOPPED: a run cap.
SERVED, CACHE_HIT, BLOCKED, RATE_LIMITED, REFUSED, DEFERRED, RUN_STOPPED = 0, 1, 2, 3, 4, 5, 6
# Kinds of extra calls.
ESCALATION, SUMMARY = 1, 2
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
class RunLog:
    """Runs one run cap stopped for one limit, the calls it refused, and when it first did."""

    runs: set[str] = field(default_factory=set)
    calls: int = 0
    first: str = ""

    def hit(self, run_id: str, when: datetime) -> None:
        self.runs.add(run_id)
        self.calls += 1
        self.first = self.first or when.isoformat()


@dataclass
class Extras:
    """Calls beyond a request's first, one per index: a cascade's next step (ESCALATION) or the
    summariser asked by compression (SUMMARY). The same fields as `Outcome`'s per-request arrays:
    `chosen` is the model the call was meant for, `served` what budgets let it use; `input` and
    `output0` are the tokens before compression and budget caps, `compressed` and `output` after."""

    req: list[int] = field(default_factory=list)
    kind: list[int] = field(default_factory=list)
    chosen: list[int] = field(default_factory=list)
    served: list[int] = field(default_factory=list)
    status: list[int] = field(default_factory=list)
    lane: list[int] = field(default_factory=list)
    input: list[int] = field(default_factory=list)
    compressed: list[int] = field(default_factory=list)
    cached: list[int] = field(default_factory=list)
    output0: list[int] = field(default_factory=list)
    output: list[int] = field(default_factory=list)
    downgraded: list[bool] = field(default_factory=list)
    truncated: list[bool] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.req)

    def add(self, req: int, kind: int, model: int, lane: int, input_tokens: int, output_tokens: int) -> int:
        for name, v in (("req", req), ("kind", kind), ("chosen", model), ("served", model), ("status", SERVED),
                        ("lane", lane), ("input", input_tokens), ("compressed", input_tokens), ("cached", 0),
                        ("output0", output_tokens), ("output", output_tokens), ("downgraded", False),
                        ("truncated", False)):
            getattr(self, name).append(v)
        return len(self.req) - 1


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
    input_tokens: np.ndarray  # as recorded
    cached: np.ndarray
    output: np.ndarray  # after any budget cap
    truncated: np.ndarray
    downgraded: np.ndarray
    budgets: dict[str, BudgetLog] = field(default_factory=dict)
    counters: dict[str, tuple[CounterState, str]] = field(default_factory=dict)  # key -> (state, budget id)
    notes: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    compressed: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # input after compression
    extras: Extras = field(default_factory=Extras)
    runs: dict[tuple[str, str], RunLog] = field(default_factory=dict)  # (cap id, limit) -> what it stopped
    stops: dict[int, tuple[str, str]] = field(default_factory=dict)  # row (i, or n + extra) -> (cap id, limit)
    cascade: dict[str, dict[str, Any]] = field(default_factory=dict)  # group -> verdict counts and rate
    compression: dict[str, int] = field(default_factory=dict)  # requests compressed, summariser calls
    forced: bool = False  # a migration: every routed request served by one model, no cascade

    def get(self, name: str, i: int, row: int) -> Any:
        """Field ``name`` of request ``i``'s own call (``row`` < 0) or of the extra call ``row``."""
        return getattr(self, name)[i] if row < 0 else getattr(self.extras, name)[row]

    def set(self, name: str, i: int, row: int, value: Any) -> None:
        if row < 0:
            getattr(self, name)[i] = value
        else:
            getattr(self.extras, name)[row] = value


def exact_key(o: Outcome, keys: list[tuple[dict[str, Any], str]] | None, i: int, model: int) -> str | None:
    """The gateway's exact-cache key of request ``i`` served by ``model`` (None: not cacheable)."""
    if keys is None or not keys[i][0]:
        return None
    payload, tenant = keys[i]
    if not cache_policy.cacheable(payload, o.policy.cfg.cache.allow_nondeterministic):
        return None
    return cache_policy.cache_key("chat", o.models[model], payload, tenant)


def exact_one(o: Outcome, keys: list[tuple[dict[str, Any], str]] | None, cache: ExactCache, i: int,
              now: float, row: int = -1, store: bool = True) -> bool:
    """Look request ``i``'s call ``row`` up at its served model; on a miss, store it unless told
    not to (the gateway never stores a cascade step's answer that is still to be verified)."""
    key = exact_key(o, keys, i, int(o.get("served", i, row)))
    if key is None:
        return False
    if cache.get(key, now) is not None:  # served from the cache: the call's own cost is avoided
        o.set("status", i, row, CACHE_HIT)
        return True
    if store:
        cache.put(key, True, now)
    return False
