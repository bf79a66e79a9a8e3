"""Budget and rate-limit decisions. Pure: attribution, budgets, a state snapshot, prices and the
time come in as arguments; holds, a token cap, a downgrade or a refusal come out. The gateway and
the replay simulator call these same functions.

Why budgets cannot overshoot: every request reserves its worst-case cost on every applicable
counter atomically before it is sent, and is bounded so the real cost cannot exceed that:
output by `max_tokens` (set by margin from the remaining budget when the client gives none),
input by its UTF-8 byte count (a byte-level BPE token always covers at least one byte)."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

from margin.domain import Attribution, usd
from margin.domain.budget import Budget, CounterState, Hold, RateLimit, Threshold, from_units, to_units

# Worst-case USD of (model, input tokens, output tokens), from the price table.
PriceFn = Callable[[str, int, int], Decimal]

COUNTER_SLACK_S = 86400.0  # a finished period's counter stays readable a day for `status`
PER_MESSAGE_TOKENS = 8  # role and separator tokens a chat template adds per message, generously


def dims_of(attribution: Attribution, workflow: str, model: str, provider: str) -> dict[str, str]:
    d = {"org": attribution.org, "team": attribution.team, "user": attribution.user, "key": attribution.key_id,
         "app": attribution.app, "env": attribution.env, "workflow": workflow, "model": model,
         "provider": provider}
    for k, v in attribution.tags:
        d["tag:" + k] = v
    return d


def scope_values(scope: Sequence[tuple[str, str]], dims: Mapping[str, str]) -> str | None:
    """The counter's scope part, or None if the budget does not apply to these dimensions."""
    parts = []
    for dim, want in scope:
        have = dims.get(dim, "")
        if want == "*":
            if not have:
                return None  # "per user" does not apply to a call with no user
        elif have != want:
            return None
        parts.append(f"{dim}={have}")
    return ",".join(parts)


def window(b: Budget, now: datetime) -> tuple[datetime, datetime]:
    """The current period, calendar-aligned in the budget's time zone (rolling: the last N s)."""
    if b.period == "rolling":
        return now - timedelta(seconds=b.rolling_s), now
    if b.period == "custom":
        assert b.custom_start is not None and b.custom_end is not None
        return b.custom_start, b.custom_end
    local = now.astimezone(ZoneInfo(b.timezone))
    day = local.replace(hour=0, minute=0, second=0, microsecond=0)
    if b.period == "day":
        start, end = day, day + timedelta(days=1)
    elif b.period == "week":
        start = day - timedelta(days=local.weekday())
        end = start + timedelta(days=7)
    else:
        start = day.replace(day=1)
        end = (start + timedelta(days=32)).replace(day=1)
    # ZoneInfo offsets follow the wall time, so these land on local midnight across DST changes.
    return start, end


@dataclass(frozen=True, slots=True)
class Applied:
    budget: Budget
    key: str
    start: datetime
    end: datetime

    @property
    def limit_units(self) -> int:
        return to_units(self.budget.limit, self.budget.unit)


def applicable(budgets: Sequence[Budget], dims: Mapping[str, str], now: datetime) -> list[Applied]:
    out = []
    for b in budgets:
        sv = scope_values(b.scope, dims)
        if sv is None:
            continue
        start, end = window(b, now)
        if b.period == "custom" and not start <= now < end:
            continue
        suffix = "r" if b.period == "rolling" else str(int(start.timestamp()))
        out.append(Applied(b, f"b:{b.id}:{sv}:{suffix}", start, end))
    return out


def input_bound(body_text_bytes: int, n_messages: int) -> int:
    """An upper bound on prompt tokens that holds for byte-level BPE tokenizers."""
    return body_text_bytes + PER_MESSAGE_TOKENS * max(1, n_messages) + 16


def downgrade_target(mapping: Sequence[tuple[str, str]], model: str) -> str | None:
    """`gpt-4o -> gpt-4o-mini` exactly, or `*-large -> *-small` with the star carried over."""
    for src, dst in mapping:
        if src == model:
            return dst
        if "*" in src and fnmatch.fnmatchcase(model, src):
            pre, _, post = src.partition("*")
            star = model[len(pre):len(model) - len(post) if post else None]
            return dst.replace("*", star, 1)
    return None


@dataclass(frozen=True, slots=True)
class Refusal:
    code: str  # budget_exceeded | budget_deferred | rate_limit_exceeded
    message: str
    retry_after_s: float
    budget_id: str = ""


@dataclass(slots=True)
class BudgetPlan:
    model: str
    holds: list[Hold] = field(default_factory=list)
    applied: list[Applied] = field(default_factory=list)
    max_tokens: int | None = None  # set when margin must cap the output
    downgraded_from: str = ""
    notify: list[tuple[Applied, Threshold, float]] = field(default_factory=list)
    refusal: Refusal | None = None


def _describe(a: Applied, state: CounterState) -> str:
    b = a.budget
    spent, reserved = (usd(from_units(n, b.unit).normalize()) for n in (state.spent, state.reserved))
    unit = "USD" if b.unit == "usd" else "tokens"
    return (f"budget '{b.label}' ({dict(b.scope) or 'global'}, {b.period}): spent {spent} {unit}"
            f" + {reserved} reserved of {b.limit} {unit}; resets {a.end.isoformat()}")


def exceeded(a: Applied, state: CounterState, now: datetime) -> Refusal:
    return Refusal("budget_exceeded", f"Budget exceeded: {_describe(a, state)}",
                   max(1.0, (a.end - now).total_seconds()), a.budget.id)


def plan(
    *, dims: Mapping[str, str], model: str, budgets: Sequence[Budget], rate_limits: Sequence[RateLimit],
    snapshot: Mapping[str, CounterState], price: PriceFn, prompt_bound: int, max_tokens: int | None,
    model_max_output: int, priority: str, now: datetime, provider_of: Callable[[str], str] | None = None,
    extra: Sequence[Applied] = (), extra_holds: Sequence[Hold] = (), min_output: int = 1,
) -> BudgetPlan:
    """Decide what a call needs from its budgets. `snapshot` is the latest known counter state
    (it steers thresholds; the hard limit is enforced by the atomic reservation of `holds`).
    `extra`: budget-like limits already applied (an agent run's dollar cap); `extra_holds`: other
    counters to reserve in the same all-or-nothing step (a run's call and repeat counts);
    `min_output`: the smallest output cap the endpoint accepts (a budget that affords less refuses)."""
    p = BudgetPlan(model=model)
    for _ in range(3):  # a downgrade may lead to another budget's downgrade; bounded
        d = dict(dims, model=p.model, provider=provider_of(p.model) if provider_of else dims.get("provider", ""))
        p.applied = applicable(budgets, d, now) + list(extra)
        p.notify.clear()
        target = _thresholds(p, snapshot, priority, now)
        if p.refusal is not None or target is None:
            break
        p.downgraded_from = p.downgraded_from or model
        p.model = target
    if p.refusal is not None:
        return p
    out = max_tokens
    if out is None and p.applied:
        out = affordable_output(p.applied, snapshot, price, p.model, prompt_bound, model_max_output)
        if out < min_output:
            tight = min(p.applied, key=lambda a: _remaining(a, snapshot))
            p.refusal = exceeded(tight, snapshot.get(tight.key, CounterState()), now)
            return p
        p.max_tokens = out
    out = out or model_max_output
    for a in p.applied:
        b = a.budget
        amount = (to_units(price(p.model, prompt_bound, out), "usd") if b.unit == "usd"
                  else prompt_bound + out)
        p.holds.append(Hold(a.key, "budget", a.limit_units, amount, a.end.timestamp() + COUNTER_SLACK_S,
                            float(b.rolling_s) if b.period == "rolling" else 0.0, b.unit))
    p.holds.extend(extra_holds)
    d = dict(dims, model=p.model)
    for rl in rate_limits:
        sv = scope_values(rl.scope, d)
        if sv is None:
            continue
        exp = now.timestamp() + 120
        if rl.rpm:
            p.holds.append(Hold(f"rl:{rl.id}:{sv}:rpm", "bucket", rl.rpm, 1, exp, 60.0, "tokens"))
        if rl.tpm:
            p.holds.append(Hold(f"rl:{rl.id}:{sv}:tpm", "bucket", rl.tpm, min(rl.tpm, prompt_bound + out), exp,
                                60.0, "tokens"))
    return p


def _remaining(a: Applied, snapshot: Mapping[str, CounterState]) -> int:
    s = snapshot.get(a.key, CounterState())
    return a.limit_units - s.spent - s.reserved


def _thresholds(p: BudgetPlan, snapshot: Mapping[str, CounterState], priority: str, now: datetime) -> str | None:
    """Apply crossed thresholds in order; returns a model to downgrade to, if any."""
    for a in p.applied:
        state = snapshot.get(a.key, CounterState())
        frac = state.used_fraction(a.limit_units)
        for th in sorted(a.budget.thresholds, key=lambda t: t.pct):
            if frac * 100 < float(th.pct):
                break
            if th.action == "notify":
                p.notify.append((a, th, frac))
            elif th.action == "block":
                p.refusal = exceeded(a, state, now)
                return None
            elif th.action == "defer" and priority == th.priority:
                p.refusal = Refusal(
                    "budget_deferred",
                    f"Deferred: {frac:.0%} of {_describe(a, state)}. Requests of priority '{priority}' wait "
                    f"for the next period (threshold {th.pct}%); send X-Margin-Priority: normal to run now",
                    max(1.0, (a.end - now).total_seconds()), a.budget.id)
                return None
            elif th.action == "downgrade":
                target = downgrade_target(th.downgrade, p.model)
                if target and target != p.model:
                    return target
    return None


def affordable_output(applied: Sequence[Applied], snapshot: Mapping[str, CounterState], price: PriceFn,
                      model: str, prompt_bound: int, model_max_output: int) -> int:
    """The largest output cap whose worst case fits every budget's remaining room (binary search:
    cliff-tiered prices are monotone but not linear)."""
    if all(_fits(a, snapshot, price, model, prompt_bound, model_max_output) for a in applied):
        return model_max_output  # the common case far from any limit: skip the search
    lo, hi = 0, model_max_output
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if all(_fits(a, snapshot, price, model, prompt_bound, mid) for a in applied):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _fits(a: Applied, snapshot: Mapping[str, CounterState], price: PriceFn, model: str, prompt: int,
          out: int) -> bool:
    need = to_units(price(model, prompt, out), "usd") if a.budget.unit == "usd" else prompt + out
    return need <= _remaining(a, snapshot)
