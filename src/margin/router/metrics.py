"""Router quality metrics, following RouteLLM (APGR, CPT) and RouterBench (AIQ).

Two-model data (weak, strong). A router gives every query a score (higher = more in need of the
strong model); sending the top-k scored queries to the strong model, for k = 0..n, gives the curve
(% calls to strong, quality). With PGR(x) = (quality(x) - q_weak) / (q_strong - q_weak):
- APGR = the area under PGR over the fraction of strong calls from 0 to 1 (trapezoidal, exact at
  every k/n), so a random router scores ~0.5 and a perfect one 1 - f/2 (f = share of queries only
  the strong model answers).
- CPT(x) = the smallest % of strong calls whose quality reaches q_weak + x (q_strong - q_weak).

AIQ (RouterBench). Take the router's operating points (mean cost, quality), drop the dominated
ones, take the upper convex hull (a router can mix two operating points at random, so every point
on the segment between them is reachable), and hold it flat right of its last vertex. AIQ is the
area under that hull over a cost range [lo, hi], divided by (hi - lo). Left of the cheapest
operating point the hull counts as 0. The range defaults to the span of the points' costs; the
CLI passes [cheapest single model's mean cost, dearest single model's mean cost] on the same test
set, so AIQ is comparable across routers on one data set. A single point at cost lo gives its
quality; if hi == lo, AIQ is the best quality reachable at cost <= hi.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.float64]


def realised(scores: Array, costs: Array, choice: npt.NDArray[np.int_]) -> tuple[float, float]:
    """(quality, mean cost) of routing query i to model choice[i]."""
    rows = np.arange(len(choice))
    return float(scores[rows, choice].mean()), float(costs[rows, choice].mean())


def oracle_choice(scores: Array, costs: Array) -> npt.NDArray[np.int_]:
    """The cheapest model with the best score on each query (the cheapest correct model for 0/1
    scores; the cheapest model when none is correct)."""
    best = scores.max(axis=1, keepdims=True)
    masked = np.where(scores >= best, costs, np.inf)
    return np.asarray(masked.argmin(axis=1), dtype=np.int64)


def oracle_cost_at(scores: Array, costs: Array, target: float) -> float | None:
    """Least mean cost at which a router that knows every answer reaches ``target`` quality:
    start from the cheapest model everywhere and upgrade queries to their cheapest best model in
    order of extra cost per quality gained (exact for 0/1 scores). None if unreachable."""
    n = len(scores)
    base_j = int(np.argmin(costs.mean(axis=0)))
    orc = oracle_choice(scores, costs)
    rows = np.arange(n)
    dq = (scores[rows, orc] - scores[:, base_j]) / n
    dc = (costs[rows, orc] - costs[:, base_j]) / n
    q, c = float(scores[:, base_j].mean()), float(costs[:, base_j].mean())
    if q >= target:
        return c
    gain = dq > 1e-15
    order = np.argsort(np.where(gain, dc / np.where(gain, dq, 1.0), np.inf), kind="stable")
    for i in order[: int(gain.sum())]:
        q, c = q + float(dq[i]), c + float(dc[i])
        if q >= target - 1e-12:
            return c
    return None


def two_model_curve(score: Array, y_weak: Array, y_strong: Array) -> tuple[Array, Array]:
    """(fraction of calls to strong, quality) for k = 0..n, sending the top-k scores to strong.
    Ties keep input order (stable sort)."""
    n = len(score)
    order = np.argsort(-np.asarray(score, dtype=np.float64), kind="stable")
    gain = (y_strong - y_weak)[order]
    quality = (y_weak.sum() + np.concatenate([[0.0], np.cumsum(gain)])) / max(n, 1)
    frac = np.arange(n + 1, dtype=np.float64) / max(n, 1)
    return frac, quality


def pgr(quality: Array, q_weak: float, q_strong: float) -> Array:
    gap = q_strong - q_weak
    if abs(gap) < 1e-12:
        return np.ones_like(quality)
    return np.asarray((quality - q_weak) / gap, dtype=np.float64)


def apgr(frac: Array, quality: Array, q_weak: float, q_strong: float) -> float:
    return float(np.trapezoid(pgr(quality, q_weak, q_strong), frac))


def cpt(frac: Array, quality: Array, q_weak: float, q_strong: float, x: float) -> float:
    """Smallest fraction of strong calls reaching PGR >= x (1.0 if never reached)."""
    hit = np.nonzero(pgr(quality, q_weak, q_strong) >= x - 1e-12)[0]
    return float(frac[hit[0]]) if len(hit) else 1.0


def hull(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Non-decreasing upper convex hull of (cost, quality) points, cheapest first."""
    pts = sorted(set((float(c), float(q)) for c, q in points), key=lambda p: (p[0], -p[1]))
    mono: list[tuple[float, float]] = []
    for c, q in pts:  # keep only points that improve on everything cheaper
        if not mono or q > mono[-1][1] + 1e-15:
            if mono and c == mono[-1][0]:
                mono[-1] = (c, q)
            else:
                mono.append((c, q))
    out: list[tuple[float, float]] = []
    for p in mono:  # upper hull (monotone chain): drop points under the chord
        while len(out) >= 2:
            (c1, q1), (c2, q2) = out[-2], out[-1]
            if (c2 - c1) * (p[1] - q1) - (q2 - q1) * (p[0] - c1) >= 0:
                out.pop()
            else:
                break
        out.append(p)
    return out


def aiq(points: Sequence[tuple[float, float]], cost_range: tuple[float, float] | None = None) -> float:
    h = hull(points)
    if not h:
        return 0.0
    lo, hi = cost_range if cost_range is not None else (min(c for c, _ in points), max(c for c, _ in points))
    cs = np.asarray([c for c, _ in h])
    qs = np.asarray([q for _, q in h])
    if hi <= lo:
        ok = qs[cs <= hi + 1e-15]
        return float(ok.max()) if len(ok) else 0.0
    start = max(lo, float(cs[0]))
    if start >= hi:
        return 0.0
    xs = np.unique(np.concatenate([[start, hi], cs[(cs > start) & (cs < hi)]]))
    ys = np.interp(xs, cs, qs)
    return float(np.trapezoid(ys, xs) / (hi - lo))


def percentile_ms(samples_s: Sequence[float]) -> dict[str, float]:
    a = np.asarray(samples_s, dtype=np.float64) * 1000.0
    return {"p50": round(float(np.percentile(a, 50)), 4), "p99": round(float(np.percentile(a, 99)), 4),
            "mean": round(float(a.mean()), 4), "n": len(a)}
