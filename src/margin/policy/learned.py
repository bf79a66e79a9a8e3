"""Choosing a model from a learned router's per-model success probabilities. Pure: plain data in,
a model name out; no I/O, standard library only.

Two rules, both from the router literature:
- ``lam``: maximise expected quality minus price, ``argmax_m p[m] - lam * cost[m]``; ``lam`` is in
  quality per USD (0 = always the most likely to succeed, large = always the cheapest).
- ``threshold``: the cheapest model with ``p[m] >= threshold``; if none, the most likely one.
Ties go to the cheaper model, then to the name.
"""

from __future__ import annotations

from collections.abc import Mapping


class ChoiceError(ValueError):
    """Nothing to choose from, or an ambiguous rule."""


def _candidates(probs: Mapping[str, float], costs: Mapping[str, float]) -> list[str]:
    names = [m for m in probs if m in costs]
    if not names:
        raise ChoiceError("no model has both a success probability and a cost")
    return names


def choose(probs: Mapping[str, float], costs: Mapping[str, float], lam: float | None = None,
           threshold: float | None = None) -> str:
    """The model to call. Exactly one of ``lam`` and ``threshold`` must be given; models missing
    from either mapping are not candidates."""
    if (lam is None) == (threshold is None):
        raise ChoiceError("give exactly one of lam and threshold")
    names = _candidates(probs, costs)
    if lam is not None:
        return min(names, key=lambda m: (-(probs[m] - lam * costs[m]), costs[m], m))
    assert threshold is not None
    ok = [m for m in names if probs[m] >= threshold]
    if ok:
        return min(ok, key=lambda m: (costs[m], -probs[m], m))
    return min(names, key=lambda m: (-probs[m], costs[m], m))


def choose_op(probs: Mapping[str, float], costs: Mapping[str, float], operating_point: Mapping[str, object]) -> str:
    """``choose`` with a router artefact's operating point ``{"rule": "lambda"|"threshold", "value": x}``."""
    rule, value = operating_point.get("rule"), operating_point.get("value")
    if not isinstance(value, int | float):
        raise ChoiceError(f"operating point has no numeric value: {dict(operating_point)!r}")
    if rule == "lambda":
        return choose(probs, costs, lam=float(value))
    if rule == "threshold":
        return choose(probs, costs, threshold=float(value))
    raise ChoiceError(f"unknown operating point rule {rule!r}")


def reason(probs: Mapping[str, float], costs: Mapping[str, float], chosen: str, lam: float | None = None,
           threshold: float | None = None) -> str:
    """One line saying why ``chosen`` was picked, for logs and response headers."""
    p, c = probs.get(chosen, float("nan")), costs.get(chosen, float("nan"))
    best = max(probs, key=lambda m: probs[m]) if probs else chosen
    head = f"learned: {chosen} p={p:.2f} cost=${c:.6f}"
    if lam is not None:
        rule = f"argmax p - {lam:g}*cost"
    elif threshold is not None:
        rule = f"cheapest with p >= {threshold:.2f}" if p >= threshold else f"none reached p >= {threshold:.2f}"
    else:
        rule = "no rule"
    best_cost = costs.get(best, float("nan"))
    tail = "" if best == chosen else f"; most likely {best} p={probs[best]:.2f} cost=${best_cost:.6f}"
    return f"{head} ({rule}){tail}"
