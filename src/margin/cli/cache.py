"""`margin cache eval`: choose a semantic-cache similarity threshold from a target precision.

Embeds every pair's first text as a cache entry and queries with the second (all-MiniLM-L6-v2,
offline), sweeps similarity thresholds with GPTCache's counting (correct hits, wrong hits, misses)
and reports the lowest threshold whose precision reaches the target. See docs/caching.md.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import typer

from margin.cli.common import console, fail, print_json, print_table

app = typer.Typer(help="Semantic cache: evaluate similarity thresholds on paraphrase pairs.", no_args_is_help=True)


@app.callback()
def _group() -> None:
    """Semantic cache tools (keeps `eval` a subcommand even while it is the only one)."""


def _fmt(v: float | None, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def save_png(rows: list[dict[str, Any]], chosen: dict[str, Any] | None, path: Path, title: str) -> None:
    """Precision and recall against threshold, plus precision against recall (matplotlib Agg)."""
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
        ax1.axvline(chosen["threshold"], color="grey", ls="--", lw=1, label=f"chosen {chosen['threshold']:.2f}")
    ax1.set_xlabel("cosine similarity threshold")
    ax1.set_ylim(0, 1.02)
    ax1.grid(alpha=0.3)
    ax1.legend(loc="lower left")
    ax1.set_title("precision / recall vs threshold")
    ax2.plot(rec, prec, marker=".", ms=3, color="tab:blue")
    for r in rows:
        t = round(r["threshold"], 2)
        if r["precision"] is not None and abs(t * 20 - round(t * 20)) < 1e-6:  # label every 0.05
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


@app.command("eval")
def eval_cmd(
    pairs: Path = typer.Option(..., "--pairs", help="Pairs: JSON / gzip JSON / gzip tar of one JSON "
                               "({text_a,text_b,label} rows or GPTCache {origin,similar})"),
    limit: int = typer.Option(5000, "--limit", help="Sample at most N pairs (fixed seed); 0 = all"),
    seed: int = typer.Option(0, "--seed", help="Sampling seed"),
    target_precision: float = typer.Option(0.99, "--target-precision", help="Choose the lowest threshold with "
                                           "precision >= this"),
    thresholds: str = typer.Option("0.5:0.99:0.01", "--thresholds", help="start:stop:step (inclusive) or a,b,c"),
    duplicates_only: bool = typer.Option(False, "--duplicates-only", help="Keep only label-1 pairs "
                                         "(GPTCache's setting: every pair a paraphrase)"),
    batch_size: int = typer.Option(128, "--batch-size", help="Embedding batch size"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table"),
    png: Path | None = typer.Option(None, "--png", help="Write the precision/recall curve here"),
) -> None:
    """Sweep similarity thresholds on paraphrase pairs and choose one for a target precision."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from margin.cache_eval.embed import EmbeddingError, MiniLM
    from margin.cache_eval.evaluate import evaluate, load_pairs, parse_thresholds, sample_pairs

    if not pairs.exists():
        fail(f"no such file: {pairs}")
    if not 0.0 < target_precision <= 1.0:
        fail("--target-precision must be in (0, 1]")
    try:
        ths = parse_thresholds(thresholds)
    except ValueError as e:
        fail(str(e))
        raise
    try:
        data = load_pairs(pairs)
    except (OSError, ValueError, KeyError) as e:
        fail(f"cannot load {pairs}: {e}")
        raise
    if duplicates_only:
        data = [p for p in data if p.label == 1]
    data = sample_pairs(data, limit or None, seed)
    if not data:
        fail("no pairs to evaluate")
    try:
        encoder = MiniLM(batch_size=batch_size)
    except EmbeddingError as e:
        fail(str(e))
        raise
    result = evaluate(data, encoder, ths, target_precision)
    out = result.to_json()
    if png is not None:
        save_png(out["sweep"], out["chosen"], png,
                 f"{pairs.name}: {result.pairs} pairs ({result.duplicates} duplicates), {result.model}")
    if as_json:
        print_json(out)
        return
    rows = [{"threshold": f"{r['threshold']:.2f}", "hits": r["hits"], "correct_hits": r["correct_hits"],
             "wrong_hits": r["wrong_hits"], "misses": r["misses"], "precision": _fmt(r["precision"]),
             "recall": _fmt(r["recall"])} for r in out["sweep"]]
    print_table(rows, f"{pairs.name}: {result.pairs} pairs, {result.duplicates} duplicates, "
                      f"{result.entries} cache entries")
    c = out["chosen"]
    if c is None:
        console.print(f"[bold red]no threshold reaches precision {target_precision}[/]")
    else:
        console.print(f"[bold]chosen threshold {c['threshold']:.2f}[/] for precision >= {target_precision}: "
                      f"precision {_fmt(c['precision'])}, recall {_fmt(c['recall'])} "
                      f"({c['correct_hits']} correct, {c['wrong_hits']} wrong, {c['misses']} misses)")
    console.print(f"{result.model}; exact numpy search; {out['queries_per_s']} queries/s "
                  f"(embed + search), timings {out['timings_s']}")
    if png is not None:
        console.print(f"wrote {png}")
