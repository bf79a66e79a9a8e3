"""PNG charts for `margin report ... --png DIR` (matplotlib, Agg backend, no display needed).
Money is converted to float here only to draw it."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

Rows = list[dict[str, Any]]


def _plt() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("--png needs matplotlib: pip install 'margin[plots]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def spend_stacked(series: Rows, title: str, out: Path) -> Path:
    """Spend per bucket, stacked by key (rows of queries.spend_series)."""
    plt = _plt()
    buckets = sorted({r["bucket"] for r in series})
    keys = sorted({r["key"] for r in series}, key=lambda k: (k == "other", k))
    val: dict[str, dict[str, float]] = defaultdict(dict)
    for r in series:
        val[r["key"]][r["bucket"]] = float(r["cost_usd"])
    fig, ax = plt.subplots(figsize=(10, 4.8))
    bottom = [0.0] * len(buckets)
    labels = [b[:10] if "T00:00" in b else b[:13] for b in buckets]
    for k in keys:
        ys = [val[k].get(b, 0.0) for b in buckets]
        ax.bar(labels, ys, bottom=bottom, label=k or "(none)")
        bottom = [a + b for a, b in zip(bottom, ys, strict=True)]
    ax.set_ylabel("USD")
    ax.set_title(title)
    ax.legend(fontsize=8, ncols=2)
    ax.tick_params(axis="x", labelrotation=60, labelsize=7)
    return _save(plt, fig, out)


def bars(rows: Rows, label: str, value: str, title: str, out: Path, xlabel: str = "USD") -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 0.45 * max(3, len(rows)) + 1))
    names = [str(r[label]) or "(none)" for r in rows][::-1]
    ax.barh(names, [float(r[value] or 0) for r in rows][::-1], color="#3b7dd8")
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    return _save(plt, fig, out)


def outcome_trend(trend: Rows, baselines: dict[str, float], title: str, out: Path) -> Path:
    """Cost per successful outcome per period and workflow, each baseline as a dashed line."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 4.8))
    by_wf: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for r in trend:
        if r["cost_per_outcome_usd"] is not None:
            by_wf[r["workflow"]].append((r["bucket"], float(r["cost_per_outcome_usd"])))
    for wf, pts in sorted(by_wf.items()):
        line = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=wf or "(none)")[0]
        if wf in baselines:
            ax.axhline(baselines[wf], linestyle="--", color=line.get_color(), label=f"{wf} baseline")
    ax.set_ylabel("USD per successful outcome")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.tick_params(axis="x", labelrotation=60, labelsize=7)
    return _save(plt, fig, out)


def histogram(values: list[float], title: str, xlabel: str, out: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.hist(values, bins=40, color="#3b7dd8")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("runs")
    ax.set_title(title)
    return _save(plt, fig, out)


def forecast(days: list[str], actual: list[float], fc_days: list[str], mean: list[float], lo: list[float],
             hi: list[float], title: str, out: Path, limit: float | None = None) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 4.8))
    ax.plot(days, actual, label="actual", color="#333")
    ax.plot(fc_days, mean, label="forecast", color="#3b7dd8")
    ax.fill_between(fc_days, lo, hi, alpha=0.25, color="#3b7dd8", label="95% interval")
    if limit is not None:
        ax.axhline(limit, linestyle="--", color="#c33", label="limit")
    ax.set_ylabel("USD per day")
    ax.set_title(title)
    ax.legend(fontsize=8)
    step = max(1, len(days + fc_days) // 20)
    ax.set_xticks((days + fc_days)[::step])
    ax.tick_params(axis="x", labelrotation=60, labelsize=7)
    return _save(plt, fig, out)


def _save(plt: Any, fig: Any, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
