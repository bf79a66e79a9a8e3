"""Scenario plots (matplotlib, the `plots` extra): monthly cost against volume with the break-even
points, and cost per user against the number of users."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from margin.planner.economics import Planner
from margin.planner.scenario import Scenario

COLORS = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray"]


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "scenario"


def _esc(text: str) -> str:
    """Literal dollars: matplotlib reads text between two $ as mathtext."""
    return text.replace("$", r"\$")


def _money(v: float, _pos: Any = None) -> str:
    for div, unit in ((1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"${v / div:g}{unit}"
    return f"${v:g}"


def save(sc: Scenario, out_dir: Path, prefix: str = "planner_", points: int = 120) -> list[Path]:
    """Write <prefix><scenario>_volume.png and <prefix><scenario>_users.png; return their paths."""
    try:
        import matplotlib
    except ImportError as e:  # an optional extra: say how to get it
        raise RuntimeError("plots need matplotlib: pip install 'margin[plots]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    p = Planner(sc)
    w = sc.workload
    lo, hi = sc.volume_range
    vols = [lo * (hi / lo) ** (i / (points - 1)) for i in range(points)]
    names = [o.name for o in sc.options]
    costs = {n: [float(p.monthly(n, v)) for v in vols] for n in names}
    out_dir.mkdir(parents=True, exist_ok=True)
    base = f"{prefix}{slug(sc.name)}"
    paths = []

    marks = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            xs = p.break_even(a, b)
            if xs:  # the last crossing: beyond it one option stays cheaper (staircases cross often)
                marks.append((xs[-1], float(p.monthly(a, xs[-1])), a, b))
    marks.sort()
    listed = marks[:10]
    fig, ax = plt.subplots(figsize=(9.5, 5.2 + 0.2 * len(listed)))
    for i, n in enumerate(names):
        ax.plot(vols, costs[n], label=_esc(n), color=COLORS[i % len(COLORS)], lw=2)
    lines = []
    for k, (v, y, a, b) in enumerate(listed, start=1):
        ax.plot([v], [y], "o", ms=11, mfc="white", mec="black", zorder=5)
        ax.annotate(str(k), (v, y), fontsize=7, ha="center", va="center", zorder=6)
        lines.append(f"{k}: {a} = {b} at {v:,.0f} req/day (${y:,.0f}/month)")
    if lines:
        fig.text(0.01, 0.01, _esc("\n".join(lines)), fontsize=7.5, va="bottom", family="monospace")
    ax.axvline(w.requests_per_day, color="grey", ls="--", lw=1)
    ax.text(w.requests_per_day, 0.02, f" scenario: {w.requests_per_day:,.0f} req/day", fontsize=8,
            color="dimgray", transform=ax.get_xaxis_transform())
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(_money))
    ax.set_xlabel("requests per day")
    ax.set_ylabel("cost per month (USD)")
    ax.set_title(_esc(f"{sc.name}: monthly cost vs volume (numbered: break-even)"), fontsize=11)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout(rect=(0, (0.12 + 0.135 * len(lines)) / fig.get_figheight() if lines else 0, 1, 1))
    path = out_dir / f"{base}_volume.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)

    fig, ax = plt.subplots(figsize=(9, 5.2))
    rpu = w.requests_per_user_per_day
    users = [v / rpu for v in vols]
    for i, n in enumerate(names):
        ax.plot(users, [c / u for c, u in zip(costs[n], users, strict=True)], label=_esc(n),
                color=COLORS[i % len(COLORS)], lw=2)
    ax.axvline(w.requests_per_day / rpu, color="grey", ls="--", lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"${v:,.2f}" if v < 100 else f"${v:,.0f}"))
    ax.set_xlabel(f"users ({rpu:g} requests per user per day)")
    ax.set_ylabel("cost per user per month (USD)")
    ax.set_title(_esc(f"{sc.name}: cost per user vs users"), fontsize=11)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    path = out_dir / f"{base}_users.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
    return paths
