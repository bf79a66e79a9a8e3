"""Every call of a replay in one set of arrays, and the report sections on compression, cascade
escalations and run caps (summary.py telescopes the levers over the same arrays)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import numpy as np

from margin.domain import ZERO, usd
from margin.replay.costing import RatesOf, price_sum, total
from margin.replay.outcome import CACHE_HIT, DEFERRED, ESCALATION, SERVED, SUMMARY, Outcome

StdSum = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray], Decimal]


@dataclass
class Calls:
    """The requests' own calls (rows 0..n-1), then the extras (cascade escalations, compression
    summaries) in the order they were made. ``ref`` is -1 for extras: the reference makes none."""

    kind: np.ndarray
    req: np.ndarray
    ref: np.ndarray
    chosen: np.ndarray
    served: np.ndarray
    status: np.ndarray
    lane: np.ndarray
    in0: np.ndarray  # input as recorded
    in1: np.ndarray  # after compression
    cached: np.ndarray
    out0: np.ndarray  # output as recorded
    out1: np.ndarray  # after budget caps

    @classmethod
    def of(cls, o: Outcome) -> Calls:
        n, ex = len(o.trace), o.extras

        def cat(main: np.ndarray, extra: list[Any]) -> np.ndarray:
            return np.concatenate([main.astype(np.int64), np.asarray(extra, dtype=np.int64)])

        ref = np.where(o.reference >= 0, o.reference, o.chosen)
        return cls(cat(np.zeros(n), ex.kind), cat(np.arange(n), ex.req), cat(ref, [-1] * len(ex)),
                   cat(o.chosen, ex.chosen), cat(o.served, ex.served), cat(o.status, ex.status), cat(o.lane, ex.lane),
                   cat(o.trace.input_tokens, ex.input), cat(o.compressed, ex.compressed), cat(o.cached, ex.cached),
                   cat(o.trace.output_tokens, ex.output0), cat(o.output, ex.output))

    def billed(self, mask: np.ndarray | None = None) -> np.ndarray:
        paid = (self.status == SERVED) | (self.status == DEFERRED)
        return np.flatnonzero(paid if mask is None else paid & mask)

    def cost(self, rates: RatesOf, rows: np.ndarray) -> Decimal:
        """What ``rows`` paid (lane-aware ``rates``)."""
        return total(price_sum(rates, self.served, self.lane, self.in1, self.cached, self.out1, rows))


def compression(o: Outcome, c: Calls, rates: RatesOf) -> dict[str, Any] | None:
    if not o.policy.compression:
        return None
    summaries = c.kind == SUMMARY
    own = c.billed(~summaries)
    return {"requests": o.compression.get("requests", 0), "tokens_saved": int((c.in0 - c.in1)[own].sum()),
            "summaries": int(summaries.sum()), "summary_cache_hits": int((summaries & (c.status == CACHE_HIT)).sum()),
            "summaries_refused": int((summaries & ~np.isin(c.status, (SERVED, CACHE_HIT))).sum()),
            "summary_cost_usd": usd(c.cost(rates, c.billed(summaries)))}


def cascade(o: Outcome, c: Calls, rates: RatesOf) -> list[dict[str, Any]]:
    if not o.cascade:
        return []
    group = np.array([o.calls[int(k)].requested_model for k in o.combo[c.req]], dtype=object) if c.req.size else \
        np.zeros(0, dtype=object)
    out = []
    for name, st in o.cascade.items():
        mine = (c.kind == ESCALATION) & (group == name)
        out.append({"group": name, **st, "escalation_calls": int(mine.sum()),
                    "escalation_cost_usd": usd(c.cost(rates, c.billed(mine)))})
    return out


def runs(o: Outcome, c: Calls, std_sum: StdSum, zeros: np.ndarray) -> dict[str, Any] | None:
    """Runs stopped by each cap and limit, the calls refused (summariser calls included), and what
    the refused requests and escalations would have cost at standard prices on the model meant for
    them (the spend that did not happen: the run-cap lever)."""
    if not o.policy.run_caps:
        return None
    ids = o.trace.attr("run_id")
    # A refused summariser call is not in the chain before compression: its saving shows there.
    priced = {r: k for r, k in o.stops.items() if c.kind[r] != SUMMARY}
    by_cap = []
    for (cap, limit), log in sorted(o.runs.items()):
        rows = np.array(sorted(r for r, k in priced.items() if k == (cap, limit)), dtype=np.int64)
        by_cap.append({"cap": cap, "limit": limit, "runs": len(log.runs), "calls": log.calls,
                       "avoided_usd": usd(std_sum(c.chosen, c.in0, zeros, c.out0, rows)), "first": log.first})
    every = np.array(sorted(priced), dtype=np.int64)
    return {"runs": len({r for r in ids.tolist() if r}) if ids is not None else 0,
            "stopped_runs": len(set().union(*(log.runs for log in o.runs.values()))),
            "stopped_calls": len(o.stops),
            "avoided_usd": usd(std_sum(c.chosen, c.in0, zeros, c.out0, every) if every.size else ZERO),
            "by_cap": by_cap}
