"""How numbers look on the pages. Money is rounded only here, for display; the exact decimal is
kept in the element's title so nobody has to trust a rounded figure."""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Any


def _dec(x: Any) -> Decimal | None:
    if x is None or x == "":
        return None
    try:
        return Decimal(str(x))
    except InvalidOperation:
        return None


def money(x: Any) -> str:
    """$1,234.57 from a dollar up; four decimals down to a cent; six below (LLM calls are cheap)."""
    d = _dec(x)
    if d is None:
        return "-"
    a = abs(d)
    places = 2 if a >= 1 or a == 0 else 4 if a >= Decimal("0.01") else 6
    q = d.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_EVEN)
    if q == 0 and d != 0:
        return ("-" if d < 0 else "") + "<$0.000001"
    sign = "-" if q < 0 else ""
    return f"{sign}${abs(q):,.{places}f}"


def num(x: Any) -> str:
    if x is None or x == "":
        return "-"
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    if v.is_integer():
        return f"{int(v):,}"
    return f"{v:,.2f}"


def compact(x: Any) -> str:
    """1.2M, 34.5k: for headline token counts."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return "-"
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.1f}{suffix}"
    return f"{v:,.0f}"


def pct(x: Any, places: int = 1) -> str:
    """A ratio (0.0123) as a percentage (1.2%)."""
    if x is None or x == "":
        return "-"
    return f"{float(x) * 100:.{places}f}%"


def ms(x: Any) -> str:
    if x is None or x == "":
        return "-"
    v = float(x)
    return f"{v / 1000:.2f} s" if v >= 1000 else f"{v:.0f} ms"


def change(x: Any) -> str:
    """Month-over-month change as +12% / -3%."""
    if x is None:
        return "no spend in the same days last month"
    v = float(x) * 100
    return f"{'+' if v >= 0 else ''}{v:.0f}% vs the same days last month"


def ratio(x: Any) -> str:
    """ROI (saving / spend) as a multiple: 2.5x, 43,010x."""
    if x is None or x == "":
        return "-"
    v = float(x)
    return f"{v:,.0f}×" if abs(v) >= 100 else f"{v:,.1f}×"


def actions(x: Any) -> str:
    """An event's recorded actions, for people: "downgrade gpt-4o → gpt-4o-mini; stopped by cap refunds-cap"."""
    import orjson

    if not x:
        return ""
    try:
        items = orjson.loads(x) if isinstance(x, str | bytes) else x
    except orjson.JSONDecodeError:
        return str(x)
    out = []
    for a in items if isinstance(items, list) else []:
        if not isinstance(a, dict):
            continue
        kind = a.get("action", "")
        if kind == "saved":
            out.append(f"saved {money(a.get('usd'))} ({a.get('lever')})")
        elif kind == "downgrade":
            out.append(f"downgraded {a.get('from')} → {a.get('to')}")
        elif kind == "run_stop":
            out.append(f"stopped by cap {a.get('cap')} ({a.get('limit')})")
        elif kind in ("block", "defer", "rate_limit"):
            out.append(f"{kind} by {a.get('budget') or 'a rate limit'}")
        elif kind == "cache_hit":
            out.append("answered from the cache")
        elif kind:
            out.append(kind.replace("_", " "))
    return "; ".join(out)


def exact(x: Any) -> str:
    d = _dec(x)
    return "" if d is None else f"exact: {d:f} USD"


FILTERS = {"money": money, "num": num, "compact": compact, "pct": pct, "ms": ms, "change": change, "exact": exact,
           "ratio": ratio, "actions": actions}
