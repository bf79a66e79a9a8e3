"""The budgets page: live status (through the admin API, exactly what `GET /admin/budgets` says),
a burn-down per USD budget with a forecast band and the predicted exhaustion day, the actions that
fired, and the edit form, whose body goes to `PUT /admin/budgets/{id}` (the same code path as the
API and the CLI, so an edit is in force for the next request)."""

from __future__ import annotations

import hashlib
import threading
import time
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

from margin.analytics import forecast as fc
from margin.analytics import queries as q
from margin.analytics.actions import budget_actions
from margin.analytics.filters import Filter
from margin.analytics.warehouse import Warehouse

HISTORY_DAYS = 56  # eight weeks: enough for the weekly seasonality the forecast models
ACTIONS = ("notify", "downgrade", "defer", "block")
_CACHE_S = 600.0


def visible(b: dict[str, Any], team: str | None) -> dict[str, Any] | None:
    """What a viewer of `team` may see of a budget: those scoped to its team, and of a per-team
    budget (team: "*") only its own counter. Admins (team None) see everything."""
    if team is None:
        return b
    want = (b.get("scope") or {}).get("team")
    if want == team:
        return b
    if want == "*":
        mine = [c for c in b.get("counters", []) if f"team={team}" in str(c.get("scope", "")).split(",")]
        return {**b, "counters": mine, "fired": [x for x in b.get("fired", []) if f"team={team}" in str(
            x.get("counter", ""))]}
    return None


def shape(b: dict[str, Any]) -> dict[str, Any]:
    """What the burn-down depends on, without the live counter values (which change on every call):
    the page's cached results are keyed by it."""
    busiest = max(b.get("counters") or [], key=lambda c: c.get("used_pct", 0), default=None)
    keep = ("id", "limit_usd", "scope", "period_start", "period_end", "thresholds")
    return {**{k: b.get(k) for k in keep}, "counters": [{"scope": busiest["scope"]}] if busiest else []}


def counter_scope(text: str) -> dict[str, str]:
    """'team=search,user=u1' (a counter's scope part) -> {"team": "search", "user": "u1"}."""
    return dict(p.split("=", 1) for p in text.split(",") if "=" in p)


class Forecasts:
    """Daily-spend forecasts per scope, kept for ten minutes: the history they fit ends yesterday,
    so refitting on every page view would only burn CPU (an ETS fit takes tens of ms)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, fc.Forecast]] = {}

    def get(self, history: list[float], start: date, horizon: int) -> fc.Forecast:
        key = hashlib.sha256(repr((history, start, horizon)).encode()).hexdigest()
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and now - hit[0] < _CACHE_S:
                return hit[1]
        out = fc.forecast(history, start, horizon)
        with self._lock:
            if len(self._cache) > 500:
                self._cache.clear()
            self._cache[key] = (now, out)
        return out


def burn(wh: Warehouse, f: Filter, b: dict[str, Any], now: datetime, forecasts: Forecasts) -> dict[str, Any]:
    """Burn-down of a USD budget's busiest counter this period, with the forecast to period end:
    by day, or by hour for periods of two days or less."""
    if b.get("limit_usd") is None:
        return {}
    limit = Decimal(str(b["limit_usd"]))
    counters = b.get("counters") or []
    busiest = max(counters, key=lambda c: c.get("used_pct", 0), default=None)
    scope = counter_scope(busiest["scope"]) if busiest else {k: v for k, v in (b.get("scope") or {}).items()
                                                             if v != "*"}
    start, end = datetime.fromisoformat(b["period_start"]), datetime.fromisoformat(b["period_end"])
    today0 = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    today = today0.date()
    hourly = end - start <= timedelta(days=2)
    if hourly:
        per_hour = q.hourly_spend(wh, f, scope, start, min(end, now))
        spent = sum(per_hour.values(), Decimal(0))
        today_spent = sum((v for t, v in per_hour.items() if t >= today0.replace(tzinfo=None)), Decimal(0))
    else:
        days = q.burn_down(wh, f, scope, start, end, limit, now)
        spent_rows = {x["day"]: Decimal(x["cost_usd"]) for x in days}
        spent = sum(spent_rows.values(), Decimal(0))
        today_spent = spent_rows.get(today.isoformat(), Decimal(0))
    past = q.burn_down(wh, f, scope, today0 - timedelta(days=HISTORY_DAYS), today0, limit, now)
    hist_map = {x["day"]: float(x["cost_usd"]) for x in past}
    history: list[float] = []
    if hist_map:
        d = datetime.fromisoformat(min(hist_map)).date()
        while d < today:
            history.append(hist_map.get(d.isoformat(), 0.0))
            d += timedelta(days=1)
    model_note = ""
    if not history:  # a scope that started spending today: its run rate so far is all there is
        elapsed = max((now - today0).total_seconds(), 3600.0)
        history = [float(today_spent) * 86400 / elapsed]
        model_note = "today's run rate"
    last = (end - timedelta(microseconds=1)).astimezone(UTC).date()
    horizon = max(1, (last - today).days + 1)
    f_ = forecasts.get(history, today, horizon)
    left, done = float(limit - spent), float(today_spent)
    if hourly:
        chart, exhausted = _chart_hourly(b, start, end, now, per_hour, f_, float(limit), done)
    else:
        chart = _chart(b, start, last, today, spent_rows, f_, float(limit), done)
        if spent >= limit:
            exhausted = {"exhausted_on": today.isoformat(), "earliest": today.isoformat(),
                         "latest": today.isoformat()}
        else:
            exhausted = fc.exhaustion_days(f_, left, done, today)
    return {"chart": chart, "spent_usd": format(spent, "f"), "counter": busiest["scope"] if busiest else "",
            "model": model_note or f_.model, "history_days": len(history), "hourly": hourly, **exhausted,
            "forecast_period_usd": format(spent + Decimal(str(round(max(0.0, float(f_.mean.sum()) - min(
                done, float(f_.mean[0]))), 6))), "f")}


def _lines(b: dict[str, Any], labels: list[str], limit: float, series: list[list[float | None]]) -> dict[str, Any]:
    actual, mean, lo, hi = series
    datasets: list[dict[str, Any]] = [
        {"label": "spent (cumulative)", "data": actual, "color": "actual"},
        {"label": "forecast", "data": mean, "dashed": True, "color": "forecast", "points": False},
        {"label": "forecast low", "data": lo, "color": "forecast", "band": "low"},
        {"label": "forecast 95% band", "data": hi, "color": "forecast", "band": "high"},
        {"label": "limit", "data": [limit] * len(labels), "color": "limit", "flat": True},
    ]
    for t in b.get("thresholds", []):
        pct = float(t["at"])
        if pct < 100:
            datasets.append({"label": f"{pct:g}% {t['action']}", "data": [limit * pct / 100] * len(labels),
                             "color": "threshold", "flat": True, "dashed": True})
    top = max([v for v in actual if v is not None] + [0.0])
    # The limit is what matters: a forecast far past it would squash everything else flat.
    return {"type": "line", "money": True, "labels": labels, "datasets": datasets, "ymax": max(limit * 1.25, top * 1.1)}


def _chart_hourly(b: dict[str, Any], start: datetime, end: datetime, now: datetime,
                  per_hour: dict[datetime, Decimal], f_: fc.Forecast, limit: float,
                  today_spent: float) -> tuple[dict[str, Any], dict[str, str | None]]:
    """Short periods: cumulative spend per hour; what today's forecast still expects is spread
    evenly over the hours left."""
    t = start.astimezone(UTC).replace(tzinfo=None, minute=0, second=0, microsecond=0)
    stop, cur = end.astimezone(UTC).replace(tzinfo=None), now.astimezone(UTC).replace(tzinfo=None)
    hours: list[datetime] = []
    while t < stop:
        hours.append(t)
        t += timedelta(hours=1)
    future = [h for h in hours if h > cur]
    rest = [max(0.0, float(x[0]) - today_spent) for x in (f_.mean, f_.lower, f_.upper)]
    step = [r / max(1, len(future)) for r in rest]
    actual: list[float | None] = []
    mean: list[float | None] = []
    lo: list[float | None] = []
    hi: list[float | None] = []
    cum, proj = 0.0, [0.0, 0.0, 0.0]
    crossed: list[str | None] = [None, None, None]
    for h in hours:
        if h <= cur:
            cum += float(per_hour.get(h, 0))
            actual.append(round(cum, 9))
            proj = [cum, cum, cum]
            mean.append(round(cum, 9) if h + timedelta(hours=1) > cur else None)
            lo.append(mean[-1])
            hi.append(mean[-1])
        else:
            actual.append(None)
            proj = [p + s for p, s in zip(proj, step, strict=True)]
            mean.append(round(proj[0], 9))
            lo.append(round(proj[1], 9))
            hi.append(round(proj[2], 9))
        for i in range(3):
            if crossed[i] is None and proj[i] >= limit * (1 - 1e-9):
                crossed[i] = h.strftime("%Y-%m-%d %H:00 UTC")
    chart = _lines(b, [h.strftime("%H:00") if len(hours) <= 25 else h.strftime("%m-%d %H:00") for h in hours],
                   limit, [actual, mean, lo, hi])
    return chart, {"exhausted_on": crossed[0], "earliest": crossed[2], "latest": crossed[1]}


def _chart(b: dict[str, Any], start: datetime, last: date, today: date, spent_rows: dict[str, Decimal],
           f_: fc.Forecast, limit: float, today_spent: float) -> dict[str, Any]:
    first = start.astimezone(UTC).date()
    labels: list[str] = []
    actual: list[float | None] = []
    mean: list[float | None] = []
    lo: list[float | None] = []
    hi: list[float | None] = []
    cum = 0.0
    d = first
    while d <= last:
        label = d.isoformat()
        labels.append(label)
        if d <= today:
            cum += float(spent_rows.get(label, 0))
            actual.append(round(cum, 9))
        else:
            actual.append(None)
        d += timedelta(days=1)
    # The band starts at today's spend so far and adds the forecast's daily mean / bounds; the sum
    # of daily bounds is wider than the true interval of a sum, so it errs on the cautious side.
    base = actual[labels.index(today.isoformat())] if today.isoformat() in labels else cum
    m = lo_ = hi_ = base or 0.0
    for label in labels:
        i = (date.fromisoformat(label) - today).days
        if i < 0:
            mean.append(None)
            lo.append(None)
            hi.append(None)
            continue
        if i == 0:
            m += max(0.0, float(f_.mean[0]) - today_spent)
            lo_ += max(0.0, float(f_.lower[0]) - today_spent)
            hi_ += max(0.0, float(f_.upper[0]) - today_spent)
        elif i < len(f_.mean):
            m, lo_, hi_ = m + float(f_.mean[i]), lo_ + float(f_.lower[i]), hi_ + float(f_.upper[i])
        mean.append(round(m, 9))
        lo.append(round(lo_, 9))
        hi.append(round(hi_, 9))
    return _lines(b, labels, limit, [actual, mean, lo, hi])


def fired_actions(wh: Warehouse, f: Filter, budgets: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per budget: how many downgrades, blocks and deferrals its thresholds caused this period."""
    starts = {b["id"]: datetime.fromisoformat(b["period_start"]) for b in budgets}
    if not starts:
        return {}
    acc: dict[str, list[dict[str, Any]]] = {}
    for x in budget_actions(wh, f, min(starts.values()), starts):
        acc.setdefault(x["budget"], []).append({"action": x["action"], "count": x["count"], "last": x["last"]})
    return {k: sorted(v, key=lambda a: ACTIONS.index(a["action"]) if a["action"] in ACTIONS else 9)
            for k, v in acc.items()}


# -- the edit form ------------------------------------------------------------------------------------

def thresholds_text(ts: list[dict[str, Any]]) -> str:
    out = []
    for t in ts:
        line = f"{Decimal(str(t['at'])).normalize():f}:{t['action']}"
        if t["action"] == "downgrade" and t.get("map"):
            line += ":" + ",".join(f"{k}={v}" for k, v in t["map"].items())
        elif t["action"] == "defer":
            line += f":{t.get('priority') or 'low'}"
        out.append(line)
    return "\n".join(out)


def parse_thresholds(text: str) -> list[dict[str, Any]]:
    """One per line, as `margin budgets set --threshold`: `50:notify`, `80:downgrade:gpt-4o=gpt-4o-mini`,
    `90:defer:low`, `100:block`."""
    out: list[dict[str, Any]] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        parts = line.split(":", 2)
        if len(parts) < 2:
            raise ValueError(f"threshold line {n} ({line!r}): use PCT:ACTION[:ARG], "
                             "e.g. 80:downgrade:gpt-4o=gpt-4o-mini")
        try:
            at = Decimal(parts[0].strip().rstrip("%"))
        except InvalidOperation:
            raise ValueError(f"threshold line {n} ({line!r}): {parts[0]!r} is not a percentage") from None
        action = parts[1].strip()
        if action not in ACTIONS:
            raise ValueError(f"threshold line {n} ({line!r}): action must be one of {', '.join(ACTIONS)}")
        t: dict[str, Any] = {"at": str(at), "action": action}
        arg = parts[2].strip() if len(parts) == 3 else ""
        if action == "downgrade":
            pairs = [p.split("=", 1) for p in arg.split(",") if p.strip()]
            if not pairs or any(len(p) != 2 or not p[0].strip() or not p[1].strip() for p in pairs):
                raise ValueError(f"threshold line {n} ({line!r}): a downgrade needs a map like gpt-4o=gpt-4o-mini")
            t["map"] = {a.strip(): b.strip() for a, b in pairs}
        elif action == "defer" and arg:
            t["priority"] = arg
        elif arg:
            raise ValueError(f"threshold line {n} ({line!r}): {action} takes no argument")
        out.append(t)
    return out


def budget_body(form: dict[str, str], current: dict[str, Any] | None) -> dict[str, Any]:
    """The JSON body for PUT /admin/budgets/{id}: the current definition with the form's changes
    (or a new budget). The admin API validates it and says precisely what is wrong."""
    keep = ("id", "name", "scope", "limit_usd", "limit_tokens", "period", "timezone", "rolling", "start", "end",
            "thresholds", "webhook")
    body: dict[str, Any] = {k: current[k] for k in keep if current and current.get(k) is not None}
    if current is None:
        bid = form.get("id", "").strip()
        if not bid:
            raise ValueError("a new budget needs an id (letters, digits, _ . -)")
        body["id"] = bid
        scope = {}
        for part in form.get("scope", "").split(","):
            if part.strip():
                k, sep, v = part.partition("=")
                if not sep or not k.strip() or not v.strip():
                    raise ValueError(f"scope {part.strip()!r}: use dimension=value, e.g. team=search (or team=*)")
                scope[k.strip()] = v.strip()
        body["scope"] = scope
        body["period"] = form.get("period", "month") or "month"
        if form.get("rolling", "").strip():
            body["rolling"] = form["rolling"].strip()
        body["timezone"] = form.get("timezone", "").strip() or "UTC"
    if "name" in form:
        body["name"] = form["name"].strip()
    limit = form.get("limit", "").strip()
    if not limit:
        raise ValueError("the limit is required")
    if current is not None and current.get("limit_tokens") is not None:
        if not (limit.isascii() and limit.isdigit()):
            raise ValueError(f"limit {limit!r}: this budget counts tokens, give a whole number")
        body["limit_tokens"] = int(limit)
    else:
        try:
            Decimal(limit)
        except InvalidOperation:
            raise ValueError(f"limit {limit!r} is not an amount in USD, e.g. 250 or 12.50") from None
        body["limit_usd"] = limit
    body["thresholds"] = parse_thresholds(form.get("thresholds", ""))
    return body
