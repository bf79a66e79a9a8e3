"""Pictures for docs/caching.md: precision and recall against threshold, and the precision-recall
curve of one or more sweeps (matplotlib, Agg backend; the `plots` extra)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def save_png(rows: list[dict[str, Any]], chosen: dict[str, Any] | None, path: Path, title: str,
             xlabel: str = "cosine similarity threshold") -> None:
    """Precision and recall against threshold, plus precision against recall."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    th = [r["threshold"] for r in rows]
    prec = [r["precision"] if r["precision"] is not None else float("nan") for r in rows]
    rec = [r["recall"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax1.plot(th, prec, label="precision", color="tab:blue")
    ax1.plot(th, rec, label="recall", color="tab:orange")
    if chosen:
        ax1.axvline(chosen["threshold"], color="grey", ls="--", lw=1, label=f"chosen {chosen['threshold']:.3g}")
    ax1.set_xlabel(xlabel)
    ax1.set_ylim(0, 1.02)
    ax1.grid(alpha=0.3)
    ax1.legend(loc="lower left")
    ax1.set_title("precision / recall vs threshold")
    ax2.plot(rec, prec, marker=".", ms=3, color="tab:blue")
    for r in rows:
        t = round(r["threshold"], 2)
        if r["precision"] is not None and abs(t * 20 - round(t * 20)) < 1e-6 and abs(r["threshold"] - t) < 1e-9:
            ax2.annotate(f"{t:.2f}", (r["recall"], r["precision"]), fontsize=7, xytext=(3, 3),
                         textcoords="offset points")
    ax2.set_xlabel("recall (correct hits / duplicate pairs)")
    ax2.set_ylabel("precision (correct / hits)")
    ax2.grid(alpha=0.3)
    ax2.set_title("precision-recall curve")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_compare_png(curves: Sequence[tuple[str, list[dict[str, Any]]]], points: Sequence[tuple[str, float, float]],
                     path: Path, title: str) -> None:
    """Several precision-recall curves on one plot, plus labelled reference points (recall, precision)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.8))
    for label, rows in curves:
        pts = [(r["recall"], r["precision"]) for r in rows if r["precision"] is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", ms=2, label=label)
    for label, rec, prec in points:
        ax.scatter([rec], [prec], marker="x", color="black", zorder=5)
        ax.annotate(label, (rec, prec), fontsize=7, xytext=(4, -10), textcoords="offset points")
    ax.set_xlabel("recall (correct hits / duplicate pairs)")
    ax.set_ylabel("precision (correct / hits)")
    ax.set_ylim(0.3, 1.01)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
