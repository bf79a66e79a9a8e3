"""What each dashboard page shows, from the analytics warehouse. Blocking (DuckDB): the gateway
runs these in a worker thread, never on its event loop.

Every query takes the page's `Filter`, whose team restriction (a viewer's team) is part of the
SQL. The queries themselves live in analytics/; this module shapes their rows for the pages. Money
stays exact decimal text; floats appear only in chart data, to be drawn."""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from datetime import datetime
from decimal import Decimal
from typing import Any

from margin.analytics import actions as act
from margin.analytics import queries as q
from margin.analytics import runs as r
from margin.analytics.filters import Filter
from margin.analytics.outcomes import Baseline
from margin.analytics.warehouse import Warehouse
from margin.ui.params import FILTER_DIMS, bucket_label, buckets

Rows = list[dict[str, Any]]
LEVERS = ("routing", "cache", "compression", "batch", "downgrade")
LEVER_LABELS = {"routing": "Routing", "cache": "Caching", "compression": "Compression", "batch": "Batch lane",
                "downgrade": "Budget downgrades"}
TOP_SERIES = 8


def _f(x: Any) -> float:
    """Chart coordinates only: never used for money that is reported."""
    return float(x) if x not in (None, "") else 0.0


def stacked(series: Rows, since: datetime, until: datetime, bucket: str) -> dict[str, Any]:
    """queries.spend_series rows -> a stacked chart: every bucket of the range, one dataset per key
    (dearest first, "other" last)."""
    slots = buckets(since, until, bucket)
    index = {t.isoformat(): i for i, t in enumerate(slots)}
    totals: dict[str, Decimal] = defaultdict(Decimal)
    values: dict[str, list[float]] = {}
    for row in series:
        i = index.get(str(row["bucket"]))
        if i is None:  # a bucket outside the zero-filled range (clock skew): skip, the table has it
            continue
        key = str(row["key"]) or "(none)"
        values.setdefault(key, [0.0] * len(slots))[i] += _f(row["cost_usd"])
        totals[key] += Decimal(row["cost_usd"])
    # A key that cost nothing (refused calls, cache hits) adds nothing to a spend chart but a legend entry.
    keys = sorted((k for k in values if totals[k] != 0), key=lambda k: (k == "other", -totals[k], k))
    return {"type": "bar", "stacked": True, "money": True, "labels": [bucket_label(t, bucket) for t in slots],
            "datasets": [{"label": k, "data": values[k]} for k in keys]}


def merged_levers(rows: Rows) -> Rows:
    """Every lever margin has, zero when it saved nothing, so an unused lever is visible as such."""
    by = {x["lever"]: x for x in rows}
    out = []
    for lever in (*LEVERS, *sorted(set(by) - set(LEVERS))):
        x = by.get(lever, {"saved_usd": "0", "tokens_saved": 0, "events": 0})
        out.append({"lever": lever, "label": LEVER_LABELS.get(lever, lever), "saved_usd": x["saved_usd"],
                    "tokens_saved": x["tokens_saved"], "events": x["events"]})
    return out


def overview(wh: Warehouse, f: Filter, now: datetime, bucket: str) -> dict[str, Any]:
    head = q.overview(wh, f, now)
    levers = merged_levers(head.pop("saved_by_lever"))
    series = q.spend_series(wh, f, by="model", bucket=bucket, top=TOP_SERIES)
    assert f.since is not None and f.until is not None
    saved_total = sum((Decimal(x["saved_usd"]) for x in levers), Decimal(0))
    return {
        "head": head, "levers": levers, "saved_total_usd": format(saved_total, "f"),
        "spend_chart": stacked(series, f.since, f.until, bucket),
        "lever_chart": {"type": "bar", "horizontal": True, "money": True, "labels": [x["label"] for x in levers],
                        "datasets": [{"label": "saved", "data": [_f(x["saved_usd"]) for x in levers]}]},
    }


def spend(wh: Warehouse, f: Filter, by: str, bucket: str, top_by: str = "user") -> dict[str, Any]:
    assert f.since is not None and f.until is not None
    series = q.spend_series(wh, f, by=by, bucket=bucket, top=TOP_SERIES)
    breakdown = q.spend_by(wh, f, [by])
    total = sum((Decimal(x["cost_usd"] or 0) for x in breakdown), Decimal(0))
    for x in breakdown:
        x["key"] = x.pop(by)
        x["share"] = float(Decimal(x["cost_usd"] or 0) / total) if total else 0.0
    return {"chart": stacked(series, f.since, f.until, bucket), "breakdown": breakdown[:100],
            "breakdown_rows": len(breakdown), "total_usd": format(total, "f"),
            "requests": sum(int(x["requests"]) for x in breakdown),
            "top": q.top_spenders(wh, f, by=top_by, limit=10), "choices": q.choices(wh, f, FILTER_DIMS)}


def spend_csv(wh: Warehouse, f: Filter, by: str, bucket: str) -> str:
    """Spend per bucket and `by` value with requests, tokens, exact USD and latency."""
    rows = q.spend_by(wh, f, [bucket, by])
    rows.sort(key=lambda x: (str(x[bucket]), str(x[by])))
    buf = io.StringIO()
    cols = [bucket, by, "requests", "errors", "input_tokens", "cached_input_tokens", "output_tokens",
            "reasoning_tokens", "cost_usd", "energy_j", "p50_ms", "p95_ms"]
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def outcomes(wh: Warehouse, f: Filter, bucket: str, fixed: dict[str, Baseline],
             periods: dict[str, tuple[datetime, datetime, str]]) -> dict[str, Any]:
    table = r.cost_per_outcome(wh, f, fixed, periods)
    trend_bucket = "week" if bucket == "week" else "day"
    trend = r.outcome_trend(wh, f, bucket=trend_bucket)
    labels = sorted({x["bucket"] for x in trend})
    flows = [x["workflow"] for x in table if x["successes"]]
    datasets: list[dict[str, Any]] = []
    for i, wf in enumerate(flows):
        pts = {x["bucket"]: x["cost_per_outcome_usd"] for x in trend if x["workflow"] == wf}
        datasets.append({"label": wf or "(none)", "data": [_f(pts[b]) if pts.get(b) else None for b in labels],
                         "color": i})
        base = next((x["baseline_cost_per_outcome_usd"] for x in table if x["workflow"] == wf), None)
        if base is not None:  # same colour as its workflow, dashed
            datasets.append({"label": f"{wf} baseline", "data": [_f(base)] * len(labels), "dashed": True,
                             "color": i, "points": False})
    mult = [x for x in table if x["runs"]]
    return {
        "table": table,
        # log scale: a human baseline is often 1000x an LLM run; on a linear axis one of them is a flat line
        "trend_chart": {"type": "line", "money": True, "log": True, "labels": labels, "datasets": datasets},
        "multiplier_chart": {"type": "bar", "horizontal": True, "labels": [x["workflow"] or "(none)" for x in mult],
                             "datasets": [
                                 {"label": "LLM calls per run", "data": [_f(x["calls_per_run"]) for x in mult]},
                                 {"label": "LLM calls per successful outcome",
                                  "data": [_f(x["calls_per_outcome"]) for x in mult]}]},
    }


def routing(wh: Warehouse, f: Filter) -> dict[str, Any]:
    mix = q.model_mix(wh, f)
    rer = q.reroutes(wh, f)
    kinds: dict[str, int] = defaultdict(int)
    for x in rer:
        kinds[str(x["kind"])] += int(x["calls"])
    names = [x["model"] or "(none)" for x in mix]
    # the same model name from two providers gets its provider in the legend
    labels = [f"{n} ({x['provider']})" if names.count(n) > 1 else n for n, x in zip(names, mix, strict=True)]
    return {
        "mix": mix, "reroutes": rer, "kinds": dict(kinds),
        "mix_chart": {"type": "doughnut", "labels": labels,
                      "datasets": [{"label": "requests", "data": [int(x["requests"]) for x in mix]}]},
        "runs": r.runs(wh, f, limit=25, order="cost"), "capped": act.cap_hits(wh, f),
    }


def run_detail(wh: Warehouse, run_id: str, f: Filter) -> dict[str, Any]:
    steps = r.run_steps(wh, run_id, f)
    total = sum((Decimal(x["cost_usd"] or 0) for x in steps), Decimal(0))
    return {"steps": steps, "total_usd": format(total, "f"),
            "capped": [x for x in steps if x["error_type"] == "run_limit_exceeded"]}
