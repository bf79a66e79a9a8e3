"""Exact Decimal cost of many requests at once. Requests are grouped by identical (model, lane,
input, cached input, output) and each distinct row is priced once by the gateway's own
`ModelRates.cost` (the function behind `PriceBook.cost`), times its count: the sum is exactly the
sum of per-request costs, with no float anywhere in the money."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal

import numpy as np

from margin.domain import ZERO, Usage
from margin.pricing import ModelRates
from margin.replay.levers import factorize

STANDARD, BATCH = 0, 1
RatesOf = Callable[[int, int], ModelRates]  # (model index, lane) -> rates


def price_sum(rates: RatesOf, model: np.ndarray, lane: np.ndarray, inp: np.ndarray, cached: np.ndarray,
              out: np.ndarray, rows: np.ndarray, by: np.ndarray | None = None,
              memo: dict[tuple[int, int, int, int, int], Decimal] | None = None) -> dict[tuple[int, int, int], Decimal]:
    """Total cost of ``rows`` (indices) per (by, model, lane); ``by`` is an optional int code per
    request (e.g. a team), 0 when not given. ``memo`` caches the cost of one request per distinct
    (model, lane, input, cached, output) across calls that share ``rates``."""
    if rows.size == 0:
        return {}
    cols = [model[rows], lane[rows], inp[rows], cached[rows], out[rows]]
    grp = by[rows] if by is not None else np.zeros(rows.size, dtype=np.int64)
    codes, first = factorize(grp, *cols)
    counts = np.bincount(codes, minlength=first.shape[0]).tolist()
    reps = [c[first].tolist() for c in (grp, *cols)]  # plain ints: numpy scalars are slow in this loop
    totals: dict[tuple[int, int, int], Decimal] = {}
    memo = {} if memo is None else memo
    rate_memo: dict[tuple[int, int], ModelRates] = {}
    for g, m, ln, i, c, o, count in zip(*reps, counts, strict=True):
        one = memo.get((m, ln, i, c, o))
        if one is None:
            r = rate_memo.get((m, ln))
            if r is None:
                r = rate_memo[(m, ln)] = rates(m, ln)
            one = memo[(m, ln, i, c, o)] = r.cost(Usage(input_tokens=i, cached_input_tokens=c,
                                                         output_tokens=o)).total_usd
        k = (g, m, ln)
        totals[k] = totals.get(k, ZERO) + one * count
    return totals


def total(t: dict[tuple[int, int, int], Decimal]) -> Decimal:
    return sum(t.values(), ZERO)


def by_index(t: dict[tuple[int, int, int], Decimal], pos: int) -> dict[int, Decimal]:
    """Fold totals onto one key position (0: by, 1: model, 2: lane)."""
    out: dict[int, Decimal] = {}
    for k, v in t.items():
        out[k[pos]] = out.get(k[pos], ZERO) + v
    return out
