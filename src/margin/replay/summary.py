"""What a replay cost, and what each lever saved, in exact Decimal USD.

Savings telescope from the reference (every request on its reference model at list price, no
lever) down to what the policy pays, one lever at a time, so they add up exactly:

  reference - routing - budget downgrades/caps - budget blocks - exact cache - prefix cache - batch = cost

(a lever can be negative: e.g. routing to a dearer model than the reference)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import numpy as np

from margin.domain import ZERO, usd
from margin.pricing import ModelRates
from margin.replay.costing import BATCH, by_index, price_sum, total
from margin.replay.engine import BLOCKED, CACHE_HIT, DEFERRED, RATE_LIMITED, REFUSED, SERVED, Outcome

LEVERS = ("routing", "budget_downgrade", "budget_block", "exact_cache", "prefix_cache", "batch")


def _rates(o: Outcome, lane_aware: bool) -> Any:
    def rates(m: int, lane: int) -> ModelRates:
        name = o.models[m]
        return o.policy.batch_rates(name) if lane_aware and lane == BATCH else o.policy.prices.rates(name)

    return rates


def summarise(o: Outcome, by: str | None = None) -> dict[str, Any]:
    tr = o.trace
    n = len(tr)
    std, lane_rates = _rates(o, False), _rates(o, True)
    zeros = np.zeros(n, dtype=np.int64)
    orig_out = tr.output_tokens
    alive = np.flatnonzero(o.status != REFUSED)
    ref = np.where(o.reference >= 0, o.reference, o.chosen)
    memo: dict[tuple[int, int, int, int, int], Decimal] = {}  # standard-rate cost per distinct request

    def std_sum(models: np.ndarray, cached: np.ndarray, out: np.ndarray, rows: np.ndarray) -> Decimal:
        return total(price_sum(std, models, zeros, tr.input_tokens, cached, out, rows, memo=memo))

    c0 = std_sum(ref, zeros, orig_out, alive)
    c1 = std_sum(o.chosen, zeros, orig_out, alive)
    refused_budget = np.flatnonzero((o.status == BLOCKED) | (o.status == RATE_LIMITED))
    blocked_usd = std_sum(o.chosen, zeros, orig_out, refused_budget)
    went = np.flatnonzero((o.status == SERVED) | (o.status == CACHE_HIT) | (o.status == DEFERRED))
    c1_went = c1 - blocked_usd
    c2 = std_sum(o.served, zeros, o.output, went)
    hits = np.flatnonzero(o.status == CACHE_HIT)
    hit_usd = std_sum(o.served, zeros, o.output, hits)
    billed = np.flatnonzero((o.status == SERVED) | (o.status == DEFERRED))
    c4 = std_sum(o.served, o.cached, o.output, billed)
    codes = _by_codes(o, by)
    final = price_sum(lane_rates, o.served, o.lane, tr.input_tokens, o.cached, o.output, billed, codes)
    cost = total(final)
    levers = {"routing": c0 - c1, "budget_downgrade": c1_went - c2, "budget_block": blocked_usd,
              "exact_cache": hit_usd, "prefix_cache": c2 - hit_usd - c4, "batch": c4 - cost}
    assert sum(levers.values(), ZERO) == c0 - cost  # the chain telescopes exactly
    by_model = by_index(final, 1)
    rows = []
    for m, name in enumerate(o.models):
        mine = o.served[billed] == m
        n_hits = int((o.served[hits] == m).sum())
        if not mine.any() and not n_hits:
            continue
        b = billed[mine]
        rows.append({"model": name, "requests": int(mine.sum()), "cache_hits": n_hits,
                     "input_tokens": int(tr.input_tokens[b].sum()), "cached_input_tokens": int(o.cached[b].sum()),
                     "output_tokens": int(o.output[b].sum()), "batch_lane": int((o.lane[b] == BATCH).sum()),
                     "cost_usd": usd(by_model.get(m, ZERO))})
    result: dict[str, Any] = {
        "policy": o.policy.name, "trace": tr.summary(), "start": o.start.isoformat(),
        "requests": n, "served": int(billed.size), "cache_hits": int(hits.size),
        "blocked": int((o.status == BLOCKED).sum()), "rate_limited": int((o.status == RATE_LIMITED).sum()),
        "deferred": int((o.status == DEFERRED).sum()), "refused": int((o.status == REFUSED).sum()),
        "downgraded": int(o.downgraded.sum()), "truncated": int(o.truncated.sum()),
        "batch_lane": int((o.lane[billed] == BATCH).sum()),
        "cost_usd": usd(cost), "reference_cost_usd": usd(c0),
        "saved_usd": usd(c0 - cost), "saved_pct": _pct(c0 - cost, c0),
        "levers": {k: usd(v) for k, v in levers.items()} | {"compression": None},
        "tokens": {"input": int(tr.input_tokens[billed].sum()), "cached_input": int(o.cached[billed].sum()),
                   "output": int(o.output[billed].sum()),
                   "saved_by_cache": int(tr.input_tokens[hits].sum() + o.output[hits].sum())},
        "by_model": rows, "routes": _routes(o), "budgets": _budgets(o), "notes": o.notes,
        "refusals": o.routed.refusals, "decide_calls": o.routed.decide_calls,
        "elapsed_s": round(o.elapsed_s, 3),
    }
    if by and codes is not None:
        names = _by_names(o, by)
        per = by_index(final, 0)
        result["by"] = {"dimension": by, "rows": [
            {by: names[g], "requests": int((codes[billed] == g).sum()), "cost_usd": usd(v)}
            for g, v in sorted(per.items(), key=lambda kv: -kv[1])]}
    return result


def _pct(part: Decimal, whole: Decimal) -> float | None:
    return round(float(part / whole * 100), 2) if whole else None


def _by_values(o: Outcome, by: str) -> list[str]:
    dims = {"team", "user", "org", "app", "env", "key_id", "workflow", "tier", "priority", "requested_model"}
    if by not in dims and not by.startswith("tag:"):
        raise ValueError(f"--by {by!r}: use one of {', '.join(sorted(dims))} or tag:<name>")
    vals = []
    for c in o.calls:
        a = c.attribution
        if by.startswith("tag:"):
            vals.append(a.tag_map.get(by[4:], ""))
        elif by in ("workflow", "tier", "priority", "requested_model"):
            vals.append(str(getattr(c, by)))
        else:
            vals.append(str(getattr(a, by)))
    return vals


def _by_names(o: Outcome, by: str) -> list[str]:
    return sorted(set(_by_values(o, by)))


def _by_codes(o: Outcome, by: str | None) -> np.ndarray | None:
    if not by:
        return None
    vals = _by_values(o, by)
    names = sorted(set(vals))
    per_call = np.array([names.index(v) for v in vals], dtype=np.int64)
    return per_call[o.combo] if len(o.combo) else np.zeros(0, dtype=np.int64)


def _routes(o: Outcome) -> list[dict[str, Any]]:
    r = o.routed
    if not r.reasons:
        return []
    counts = np.bincount(r.reason, minlength=len(r.reasons))
    order = np.argsort(-counts)[:12]
    return [{"reason": r.reasons[int(i)], "requests": int(counts[i])} for i in order if counts[i]]


def _budgets(o: Outcome) -> list[dict[str, Any]]:
    out = []
    for b in o.policy.budgets:
        log = o.budgets.get(b.id)
        if log is None:
            continue
        mine = [(k, st) for k, (st, bid) in o.counters.items() if bid == b.id]
        unit_scale = Decimal("1e9") if b.unit == "usd" else Decimal(1)
        top = max((Decimal(st.spent) / unit_scale for _, st in mine), default=ZERO)
        out.append({"budget": b.id, "limit": str(b.limit), "unit": b.unit, "period": b.period,
                    "counters": len(mine), "max_spent": usd(top), "blocks": log.blocks, "defers": log.defers,
                    "downgrades": log.downgrades, "truncations": log.truncations, "notifies": log.notifies,
                    "first": log.first})
    return out


def diff(current: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    """How the policy compares with the baseline on the same trace (policy minus baseline)."""
    def dec(x: Any) -> Decimal:
        return Decimal(x) if x is not None else ZERO

    cur, base = dec(current["cost_usd"]), dec(baseline["cost_usd"])
    models = {r["model"] for r in current["by_model"]} | {r["model"] for r in baseline["by_model"]}
    per_model = []
    for m in sorted(models):
        a = next((dec(r["cost_usd"]) for r in current["by_model"] if r["model"] == m), ZERO)
        b = next((dec(r["cost_usd"]) for r in baseline["by_model"] if r["model"] == m), ZERO)
        per_model.append({"model": m, "policy_usd": usd(a), "baseline_usd": usd(b), "delta_usd": usd(a - b)})
    return {
        "policy": current["policy"], "baseline": baseline["policy"], "policy_cost_usd": usd(cur),
        "baseline_cost_usd": usd(base), "delta_usd": usd(cur - base), "delta_pct": _pct(cur - base, base),
        "by_model": per_model,
        "levers": {k: usd(dec(current["levers"].get(k)) - dec(baseline["levers"].get(k))) for k in LEVERS},
        "counts": {k: current[k] - baseline[k] for k in ("served", "cache_hits", "blocked", "deferred",
                                                         "downgraded", "truncated", "batch_lane")},
    }
