"""Agent run governance. Pure: the caps, the run's counter snapshot and the time come in; the
holds a call needs, or the reason to stop the run, come out. The gateway and replay call this.

No agent framework caps a run in dollars; margin does, exactly: the run's dollar cap is reserved
like a budget (worst case before the call, settled after), so concurrent steps of one run cannot
spend past it, and a call whose worst case no longer fits is stopped before it is sent.

Counters (shared by every replica through the state backend), per cap and run:
  run:<cap>:calls:<run>     LLM calls (reserved 1 per call)
  run:<cap>:usd:<run>       spend (a budget-like hold)
  run:<cap>:tools:<run>     tool calls the model issued (added after each answer)
  run:<cap>:h-<hash>:<run>  calls whose newest message had this hash (loop detection)
The run id comes last so it may contain any character."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson

from margin.domain import responses, usd
from margin.domain.budget import Budget, CounterState, Hold, RunCap, Threshold, from_units, to_units
from margin.policy.budget import COUNTER_SLACK_S, Applied, scope_values

_BLOCK = (Threshold(Decimal(100), "block"),)


def key(cap: RunCap, what: str, run_id: str) -> str:
    return f"run:{cap.id}:{what}:{run_id}"


def parse_key(counter: str) -> tuple[str, str, str] | None:
    """(cap id, what, run id) of a run counter key, or None for any other counter."""
    parts = counter.split(":", 3)
    if len(parts) != 4 or parts[0] != "run":
        return None
    return parts[1], parts[2], parts[3]


def message_hash(endpoint: str, payload: Mapping[str, Any]) -> str:
    """What loop detection compares: the newest message of a chat (a tool result or user turn
    repeated verbatim means the agent is going round in circles), or the whole prompt."""
    if endpoint in ("chat", "response"):
        listed = responses.turns(endpoint, payload)
        newest: Any = listed[-1] if listed else None
    else:
        newest = payload.get("prompt") if endpoint == "completion" else payload.get("input")
    blob = orjson.dumps(newest, option=orjson.OPT_SORT_KEYS, default=str)
    return hashlib.blake2b(blob, digest_size=8).hexdigest()


def applicable(caps: Sequence[RunCap], dims: Mapping[str, str], run_id: str) -> list[RunCap]:
    if not run_id:
        return []
    return [c for c in caps if scope_values(c.scope, dims) is not None]


@dataclass(frozen=True, slots=True)
class RunStop:
    cap: RunCap
    limit: str  # max_calls | max_tool_calls | max_usd | max_wall_s | max_repeats
    message: str


@dataclass(slots=True)
class RunPlan:
    holds: list[Hold] = field(default_factory=list)  # call and repeat counters (all-or-nothing with budgets)
    dollars: list[Applied] = field(default_factory=list)  # dollar caps, planned like budgets
    tool_counters: list[Hold] = field(default_factory=list)  # where to add the tool calls answered
    stop: RunStop | None = None


def tool_counter(cap: RunCap, run_id: str, expires_at: float) -> Hold:
    return Hold(key(cap, "tools", run_id), "budget", cap.max_tool_calls or 0, 0, expires_at, unit="calls")


def plan(caps: Sequence[RunCap], run_id: str, message: str, snapshot: Mapping[str, CounterState],
         started_at: Mapping[str, float], now: datetime) -> RunPlan:
    """`snapshot` must hold the fresh tool counters; `started_at` the run's first call per cap id
    (epoch seconds) for caps with a wall-time limit."""
    p = RunPlan()
    t = now.timestamp()
    for cap in caps:
        expires = t + cap.ttl_s
        if cap.max_wall_s is not None:
            start = started_at.get(cap.id)
            if start is not None and t - start > cap.max_wall_s:
                p.stop = RunStop(cap, "max_wall_s", f"Run '{run_id}' has run {t - start:.0f} s, over its "
                                 f"{cap.max_wall_s:g} s wall-time cap (run cap '{cap.id}')")
                return p
        if cap.max_tool_calls is not None:
            used = snapshot.get(key(cap, "tools", run_id), CounterState()).spent
            if used > cap.max_tool_calls:
                p.stop = RunStop(cap, "max_tool_calls", f"Run '{run_id}' issued {used} tool calls, over its "
                                 f"cap of {cap.max_tool_calls} (run cap '{cap.id}')")
                return p
            p.tool_counters.append(tool_counter(cap, run_id, expires))
        if cap.max_calls is not None:
            p.holds.append(Hold(key(cap, "calls", run_id), "budget", cap.max_calls, 1, expires, unit="calls"))
        if cap.max_repeats is not None and message:
            p.holds.append(Hold(key(cap, f"h-{message}", run_id), "budget", cap.max_repeats, 1, expires,
                                unit="calls"))
        if cap.max_usd is not None:
            end = now + timedelta(seconds=cap.ttl_s)
            b = Budget(id=f"run:{cap.id}", name=f"run cap {cap.id}", limit=cap.max_usd, scope=cap.scope,
                       period="custom", custom_start=now, custom_end=end, thresholds=_BLOCK)
            p.dollars.append(Applied(b, key(cap, "usd", run_id), now, end))
    return p


def stop_for(counter: str, caps: Sequence[RunCap], state: CounterState) -> RunStop | None:
    """Why a run counter refused a reservation (or a dollar cap refused the plan)."""
    parsed = parse_key(counter)
    if parsed is None:
        return None
    cap_id, what, run_id = parsed
    cap = next((c for c in caps if c.id == cap_id), None)
    if cap is None:
        return None
    if what == "calls":
        return RunStop(cap, "max_calls", f"Run '{run_id}' reached its cap of {cap.max_calls} LLM calls "
                       f"(run cap '{cap.id}')")
    if what.startswith("h-"):
        return RunStop(cap, "max_repeats", f"Run '{run_id}' looks like a loop: the same message was sent "
                       f"{state.spent + state.reserved} times, the most its cap allows is {cap.max_repeats} "
                       f"(run cap '{cap.id}')")
    spent, reserved = (usd(from_units(n, "usd").normalize()) for n in (state.spent, state.reserved))
    return RunStop(cap, "max_usd", f"Run '{run_id}' would exceed its {cap.max_usd} USD cap: spent {spent} USD "
                   f"+ {reserved} reserved, and this call's worst case does not fit (run cap '{cap.id}')")


# Ledger error types of calls refused at admission: they took nothing from a run's counters.
REFUSED_AT_ADMISSION = frozenset({"budget_exceeded", "budget_deferred", "rate_limit_exceeded", "run_limit_exceeded",
                                  "budget_state_unavailable"})


@dataclass(frozen=True, slots=True)
class RunCall:
    """One ledger event of an agent run, as counter recovery reads it."""

    run_id: str
    dims: Mapping[str, str]
    ts: float  # epoch seconds the call started
    cost_usd: Decimal
    tool_calls: int
    admitted: bool = True  # False: refused at admission; it took nothing but did start the run's clock


def recovered(caps: Sequence[RunCap], calls: Sequence[RunCall], now: float) -> list[tuple[Hold, int]]:
    """The run counters the ledger implies (dollars, calls, tool calls) that are still alive at `now`:
    what a fresh state (a restart, or Redis back empty) needs so a running agent does not get its cap
    anew. A live counter expires `span` after its run's last call (ttl_s; a dollar cap keeps its
    counter COUNTER_SLACK_S longer) and a call after that starts it again, so each counter sums the
    calls since the last such gap. Loop-detection hashes are not in the ledger (see `recovered_starts`
    for the wall-time clock)."""
    series: dict[str, tuple[RunCap, str, str, list[tuple[float, int]]]] = {}
    for c in calls:
        if not c.admitted:
            continue
        for cap in applicable(caps, c.dims, c.run_id):
            for what, units, on in (("usd", to_units(c.cost_usd, "usd"), cap.max_usd is not None),
                                    ("calls", 1, cap.max_calls is not None),
                                    ("tools", c.tool_calls, cap.max_tool_calls is not None)):
                if on:
                    series.setdefault(key(cap, what, c.run_id), (cap, what, c.run_id, []))[3].append((c.ts, units))
    out: list[tuple[Hold, int]] = []
    for k, (cap, what, run_id, points) in series.items():
        span = cap.ttl_s + (COUNTER_SLACK_S if what == "usd" else 0.0)
        total, last = 0, float("-inf")
        for ts, units in sorted(points):
            total = units if ts >= last + span else total + units  # the counter had expired: it restarted
            last = ts
        if last + span <= now:
            continue  # expired: the run's next call starts afresh, as it would have live
        if what == "usd":  # as a dollar cap's Applied is held: a custom budget ending ttl_s after the call
            hold = Hold(k, "budget", to_units(cap.max_usd or Decimal(0), "usd"), 0, last + span, unit="usd")
        elif what == "calls":
            hold = Hold(k, "budget", cap.max_calls or 0, 0, last + span, unit="calls")
        else:
            hold = tool_counter(cap, run_id, last + span)
        out.append((hold, total))
    return out


def recovered_starts(caps: Sequence[RunCap], calls: Sequence[RunCall], now: float) -> list[tuple[str, float, float]]:
    """The wall-time clocks the ledger implies, as `State.first_seen` holds them: (key, the run's start,
    expiry) for each run still alive under a cap with max_wall_s. Live, the clock starts at a run's
    first call and lives ttl_s past its latest one, so a run that paused longer starts a new clock."""
    runs: dict[str, tuple[RunCap, list[float]]] = {}
    for c in calls:
        for cap in applicable(caps, c.dims, c.run_id):
            if cap.max_wall_s is not None:
                runs.setdefault(key(cap, "start", c.run_id), (cap, []))[1].append(c.ts)
    out: list[tuple[str, float, float]] = []
    for k, (cap, times) in runs.items():
        start, last = float("-inf"), float("-inf")
        for ts in sorted(times):
            if ts >= last + cap.ttl_s:
                start = ts  # the clock had expired: this call started it again
            last = ts
        if last + cap.ttl_s > now:
            out.append((k, start, last + cap.ttl_s))
    return out
