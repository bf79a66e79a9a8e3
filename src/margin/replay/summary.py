"""What a replay cost, and what each lever saved, in exact Decimal USD.

Savings telescope from the reference (every request on its reference model at list price, no
lever) down to what the policy pays, one lever at a time, so they add up exactly:

  reference - routing - cascade escalations - budget downgrades/caps - budget blocks - run caps
            - exact cache - compression - prefix cache - batch = cost

Each step prices every call (a request's own, its cascade escalations, its compression summaries:
sections.Calls) with one more lever switched on. A lever can be negative: routing to a dearer model
than the reference; cascade escalations (calls the reference never makes); compression whose
summaries cost more than the tokens they save. The compression lever is the exact price
difference of the smaller prompts, net of what the summariser calls cost."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import numpy as np

from margin.domain import ZERO, usd
from margin.pricing import ModelRates
from margin.replay import sections
from margin.replay.costing import BATCH, by_index, price_sum, total
from margin.replay.engine import BLOCKED, CACHE_HIT, DEFERRED, RATE_LIMITED, REFUSED, RUN_STOPPED, SERVED, Outcome
from margin.replay.outcome import ESCALATION, SUMMARY

LEVERS = ("routing", "cascade", "budget_downgrade", "budget_block", "run_cap", "exact_cache", "compression",
          "prefix_cache", "batch")


def _rates(o: Outcome, lane_aware: bool) -> Any:
    def rates(m: int, lane: int) -> ModelRates:
        name = o.models[m]
        return o.policy.batch_rates(name) if lane_aware and lane == BATCH else o.policy.prices.rates(name)

    return rates


def summarise(o: Outcome, by: str | None = None) -> dict[str, Any]:
    tr = o.trace
    n = len(tr)
    c = sections.Calls.of(o)
    std, lane_rates = _rates(o, False), _rates(o, True)
    zeros = np.zeros(c.kind.shape[0], dtype=np.int64)
    memo: dict[tuple[int, int, int, int, int], Decimal] = {}  # standard-rate cost per distinct call

    def std_sum(models: np.ndarray, inp: np.ndarray, cached: np.ndarray, out: np.ndarray, rows: np.ndarray) -> Decimal:
        return total(price_sum(std, models, zeros, inp, cached, out, rows, memo=memo))

    main, esc, own = c.kind == 0, c.kind == ESCALATION, c.kind != SUMMARY
    st = c.status
    alive = np.flatnonzero(main & (st != REFUSED))
    c0 = std_sum(c.ref, c.in0, zeros, c.out0, alive)
    c1 = std_sum(c.chosen, c.in0, zeros, c.out0, alive)
    escalations = std_sum(c.chosen, c.in0, zeros, c.out0, np.flatnonzero(esc))
    refused_budget = np.flatnonzero(own & ((st == BLOCKED) | (st == RATE_LIMITED)))
    blocked_usd = std_sum(c.chosen, c.in0, zeros, c.out0, refused_budget)
    stopped = np.flatnonzero(own & (st == RUN_STOPPED))
    stopped_usd = std_sum(c.chosen, c.in0, zeros, c.out0, stopped)
    went = np.flatnonzero(own & ((st == SERVED) | (st == CACHE_HIT) | (st == DEFERRED)))
    c2 = std_sum(c.served, c.in0, zeros, c.out1, went)
    hits = np.flatnonzero(own & (st == CACHE_HIT))
    hit_usd = std_sum(c.served, c.in0, zeros, c.out1, hits)
    billed = c.billed()  # every kind: summaries are paid calls too
    # Without compression or side calls the step is the previous one less the hits (spares a pass).
    compressed = len(o.extras) > 0 or bool((c.in1 != c.in0).any())
    c3 = std_sum(c.served, c.in1, zeros, c.out1, billed) if compressed else c2 - hit_usd
    c4 = std_sum(c.served, c.in1, c.cached, c.out1, billed)
    codes = _by_codes(o, by)
    final = price_sum(lane_rates, c.served, c.lane, c.in1, c.cached, c.out1, billed,
                      codes[c.req] if codes is not None else None)
    cost = total(final)
    levers = {"routing": c0 - c1, "cascade": -escalations,
              "budget_downgrade": c1 + escalations - blocked_usd - stopped_usd - c2, "budget_block": blocked_usd,
              "run_cap": stopped_usd, "exact_cache": hit_usd, "compression": c2 - hit_usd - c3,
              "prefix_cache": c3 - c4, "batch": c4 - cost}
    assert sum(levers.values(), ZERO) == c0 - cost  # the chain telescopes exactly
    by_model = by_index(final, 1)
    mine_billed = billed[c.kind[billed] == 0]
    rows = []
    for m, name in enumerate(o.models):
        b = billed[c.served[billed] == m]
        n_hits = int((c.served[st == CACHE_HIT] == m).sum())  # summaries' hits too
        if not b.size and not n_hits:
            continue
        rows.append({"model": name, "requests": int((c.kind[b] == 0).sum()), "side_calls": int((c.kind[b] != 0).sum()),
                     "cache_hits": n_hits, "input_tokens": int(c.in1[b].sum()),
                     "cached_input_tokens": int(c.cached[b].sum()), "output_tokens": int(c.out1[b].sum()),
                     "batch_lane": int((c.lane[b] == BATCH).sum()), "cost_usd": usd(by_model.get(m, ZERO))})
    main_st = o.status
    result: dict[str, Any] = {
        "policy": o.policy.name, "trace": tr.summary(), "start": o.start.isoformat(),
        "requests": n, "served": int(mine_billed.size), "cache_hits": int((main_st == CACHE_HIT).sum()),
        "blocked": int((main_st == BLOCKED).sum()), "rate_limited": int((main_st == RATE_LIMITED).sum()),
        "deferred": int((main_st == DEFERRED).sum()), "refused": int((main_st == REFUSED).sum()),
        "run_stopped": int((main_st == RUN_STOPPED).sum()),
        "downgraded": int(o.downgraded.sum()), "truncated": int(o.truncated.sum()),
        "batch_lane": int((o.lane[mine_billed] == BATCH).sum()),
        "cost_usd": usd(cost), "reference_cost_usd": usd(c0),
        "saved_usd": usd(c0 - cost), "saved_pct": _pct(c0 - cost, c0),
        "levers": {k: usd(v) for k, v in levers.items()},
        "tokens": {"input": int(c.in1[billed].sum()), "cached_input": int(c.cached[billed].sum()),
                   "output": int(c.out1[billed].sum()),
                   "saved_by_cache": int(c.in0[hits].sum() + c.out1[hits].sum()),
                   "saved_by_compression": int((c.in0 - c.in1)[billed[c.kind[billed] != SUMMARY]].sum())},
        "by_model": rows, "routes": _routes(o), "budgets": _budgets(o),
        "compression": sections.compression(o, c, lane_rates), "cascade": sections.cascade(o, c, lane_rates),
        "runs": sections.runs(o, c, std_sum, zeros),
        "notes": o.notes, "refusals": o.routed.refusals, "decide_calls": o.routed.decide_calls,
        "elapsed_s": round(o.elapsed_s, 3),
    }
    if by and codes is not None:
        names = _by_names(o, by)
        per = by_index(final, 0)
        result["by"] = {"dimension": by, "rows": [
            {by: names[g], "requests": int((codes[mine_billed] == g).sum()), "cost_usd": usd(v)}
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
        "counts": {k: current.get(k, 0) - baseline.get(k, 0) for k in (
            "served", "cache_hits", "blocked", "run_stopped", "deferred", "downgraded", "truncated", "batch_lane")},
    }
