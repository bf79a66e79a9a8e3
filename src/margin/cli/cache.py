"""`margin cache ...`: measure and configure the semantic cache (docs/caching.md).

- `eval`: serve-decision sweep on paraphrase pairs with GPTCache's counting (cosine, or a verifier);
- `train-verifier`: train and calibrate the verifier, write a versioned artefact;
- `bench-ann`: exact search against usearch, hnswlib and faiss on real embeddings;
- `export-onnx`: export all-MiniLM-L6-v2 to ONNX (the gateway's embedder) from the bundled weights.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import typer

from margin.cli.common import console, fail, print_json, print_table

app = typer.Typer(help="Semantic cache: evaluate, train the verifier, choose the search.", no_args_is_help=True)
PAIRS_HELP = "Pairs: JSON / gzip JSON / gzip tar of one JSON ({text_a,text_b,label} rows or GPTCache {origin,similar})"


@app.callback()
def _group() -> None:
    """Semantic cache tools."""


def _fmt(v: float | None, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _encoder(embedder: str, batch_size: int, cache_dir: Path | None) -> Any:
    """The embedding model, wrapped in the on-disk embedding cache unless `cache_dir` is None."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from margin.cache_eval.embed import EmbeddingError, MiniLM

    try:
        if embedder == "onnx":
            from margin.cache_eval.onnx_embed import OnnxMiniLM

            enc: Any = OnnxMiniLM(batch_size=batch_size)
        elif embedder == "torch":
            enc = MiniLM(batch_size=batch_size)
        else:
            fail(f"--embedder must be onnx or torch, not {embedder!r}")
    except EmbeddingError as e:
        fail(str(e))
        raise
    if cache_dir is None:
        return enc
    from margin.cache_eval.disk import DiskCachedEncoder

    def progress(done: int, total: int) -> None:
        print(f"embedded {done}/{total} new texts", file=sys.stderr, flush=True)

    return DiskCachedEncoder(enc, cache_dir, progress)


def _load(pairs: Path) -> list[Any]:
    from margin.cache_eval.evaluate import load_pairs

    if not pairs.exists():
        fail(f"no such file: {pairs}")
    try:
        return load_pairs(pairs)
    except (OSError, ValueError, KeyError) as e:
        fail(f"cannot load {pairs}: {e}")
        raise


def _check_search(search: str) -> None:
    from margin.cache_eval.ann import KINDS

    if search not in KINDS:
        fail(f"--search must be one of {', '.join(KINDS)}, not {search!r}")


EMBEDDER_OPT = typer.Option("onnx", "--embedder", help="onnx (ONNX Runtime export) or torch (sentence-transformers)")
CACHE_DIR_OPT = typer.Option(Path(".margin/cache_eval"), "--cache-dir", help="On-disk embedding cache")
NO_DISK_OPT = typer.Option(False, "--no-disk-cache", help="Embed everything again; write nothing")


@app.command("eval")
def eval_cmd(
    pairs: Path = typer.Option(..., "--pairs", help=PAIRS_HELP),
    limit: int = typer.Option(5000, "--limit", help="Sample at most N pairs (fixed seed); 0 = all"),
    seed: int = typer.Option(0, "--seed", help="Sampling seed"),
    target_precision: float = typer.Option(0.99, "--target-precision", help="Choose the lowest threshold from which "
                                           "precision stays >= this"),
    thresholds: str | None = typer.Option(None, "--thresholds", help="start:stop:step (inclusive) or a,b,c "
                                          "(default 0.5:0.99:0.01 for cosine; 0.05-0.995 for a verifier)"),
    duplicates_only: bool = typer.Option(False, "--duplicates-only", help="Keep only label-1 pairs "
                                         "(GPTCache's setting: every pair a paraphrase)"),
    per_cluster: bool = typer.Option(False, "--one-per-cluster", help="With --duplicates-only: at most one pair "
                                     "per duplicate cluster, so each query has exactly one labelled paraphrase "
                                     "cached (the QQP sample closest to GPTCache's 999 distinct questions)"),
    verifier: Path | None = typer.Option(None, "--verifier", help="Verifier artefact (margin cache train-verifier): "
                                         "serve the best of the top-k by its score instead of the nearest by cosine"),
    top_k: int | None = typer.Option(None, "--top-k", help="Candidates retrieved per query (default: the "
                                     "verifier's, else 1)"),
    search: str = typer.Option("exact", "--search", help="exact, usearch, hnswlib or faiss"),
    cosine: bool = typer.Option(False, "--cosine", help="With --verifier: use it only to pick the held-out split; "
                                "decide by the nearest entry's cosine (the baseline on the same pairs)"),
    split: str = typer.Option("auto", "--split", help="With --verifier: auto (held-out evaluation split if PAIRS is "
                              "the training data, else all), eval, or all"),
    embedder: str = EMBEDDER_OPT,
    batch_size: int = typer.Option(64, "--batch-size", help="Embedding batch size"),
    cache_dir: Path = CACHE_DIR_OPT,
    no_disk_cache: bool = NO_DISK_OPT,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table"),
    png: Path | None = typer.Option(None, "--png", help="Write the precision/recall curve here"),
) -> None:
    """Sweep serve thresholds on paraphrase pairs (GPTCache's counting) and choose one for a target precision."""
    from margin.cache_eval.evaluate import parse_thresholds, sample_pairs

    if not 0.0 < target_precision <= 1.0:
        fail("--target-precision must be in (0, 1]")
    if split not in ("auto", "eval", "all"):
        fail(f"--split must be auto, eval or all, not {split!r}")
    _check_search(search)
    ver: Any = None
    if verifier is not None:
        from margin.cache_eval.artefact import ArtefactError, load_verifier

        try:
            ver = load_verifier(verifier)
        except ArtefactError as e:
            fail(str(e))
        ver.manifest["path"] = str(verifier)
    try:
        from margin.cache_eval.verified import VERIFIER_THRESHOLDS

        ths = (parse_thresholds(thresholds) if thresholds
               else list(VERIFIER_THRESHOLDS) if ver is not None and not cosine else parse_thresholds("0.5:0.99:0.01"))
    except ValueError as e:
        fail(str(e))
        raise
    k = top_k or (ver.top_k if ver is not None and not cosine else 1)
    if k < 1:
        fail("--top-k must be >= 1")
    data = _load(pairs)
    from margin.cache_eval.clusters import duplicate_clusters

    clusters = duplicate_clusters(data)  # the whole file's labels, for the second count
    held_note = "all pairs"
    if ver is not None and split != "all":
        from margin.cache_eval.verified import held_out

        ev = held_out(data, ver)
        if split == "eval" and ev is None:
            fail(f"--split eval: {pairs} is not the data {verifier} was trained on")
        if ev is not None:
            data, held_note = ev, "held-out evaluation split"
    if per_cluster and not duplicates_only:
        fail("--one-per-cluster needs --duplicates-only")
    if duplicates_only:
        data = [p for p in data if p.label == 1]
    if per_cluster:
        from margin.cache_eval.clusters import one_per_cluster

        data = one_per_cluster(data, clusters, seed)
        held_note += ", one pair per duplicate cluster"
    data = sample_pairs(data, limit or None, seed)
    if not data:
        fail("no pairs to evaluate")
    from margin.cache_eval.verified import evaluate_retrieved, search_recall
    from margin.cache_eval.verifier import retrieve

    enc = _encoder(embedder, batch_size, None if no_disk_cache else cache_dir)
    r = retrieve(data, enc, k, search)
    result = evaluate_retrieved(r, ths, target_precision, enc.name, search, None if cosine else ver, clusters)
    result.extra.update({"data": held_note, "retrieval_recall_at_k": round(search_recall(r), 4),
                         # queries_per_s counts cached embeddings as free: measure speed with --no-disk-cache
                         "embedding_cache": None if no_disk_cache else str(cache_dir)})
    out = result.to_json()
    if png is not None:
        from margin.cache_eval.plots import save_png

        save_png(out["sweep"], out["chosen"], png,
                 f"{pairs.name} ({held_note}): {result.pairs} pairs ({result.duplicates} duplicates), "
                 f"{result.decision}, top-{k} {search}",
                 "verifier score threshold" if result.decision == "verifier" else "cosine similarity threshold")
    if as_json:
        print_json(out)
        return
    rows = [{"threshold": f"{r['threshold']:.3f}", "hits": r["hits"], "correct_hits": r["correct_hits"],
             "wrong_hits": r["wrong_hits"], "misses": r["misses"], "precision": _fmt(r["precision"]),
             "recall": _fmt(r["recall"])} for r in out["sweep"]]
    print_table(rows, f"{pairs.name} ({held_note}): {result.pairs} pairs, {result.duplicates} duplicates, "
                      f"{result.entries} cache entries; {result.decision} on top-{k} ({result.search})")
    c = out["chosen"]
    if c is None:
        console.print(f"[bold red]no threshold reaches precision {target_precision}[/]")
    else:
        console.print(f"[bold]chosen threshold {c['threshold']:.3f}[/] for precision >= {target_precision}: "
                      f"precision {_fmt(c['precision'])}, recall {_fmt(c['recall'])} "
                      f"({c['correct_hits']} correct, {c['wrong_hits']} wrong, {c['misses']} misses)")
    for label, comp in (("GPTCache's counting", out["gptcache_comparison"]),
                        ("by duplicate cluster", out.get("by_duplicate_cluster", {}).get("gptcache_comparison", []))):
        for g in comp:
            where = (f"threshold {g['threshold']}: {g['wrong_per_999']} wrong per 999" if g["threshold"] is not None
                     else "recall not reached")
            console.print(f"{label}, at GPTCache's recall {g['gptcache_recall']} ({g['gptcache_wrong_per_999']} "
                          f"wrong): {where}; target <= {g['gptcache_wrong_per_999'] / 2} "
                          f"{'met' if g['met'] else 'not met'}")
    console.print(f"{result.model}; {out['queries_per_s']} queries/s (embed + search + decide), "
                  f"timings {out['timings_s']}")
    if png is not None:
        console.print(f"wrote {png}")


@app.command("train-verifier")
def train_verifier_cmd(
    pairs: Path = typer.Option(..., "--pairs", help=PAIRS_HELP),
    out: Path = typer.Option(..., "--out", help="Artefact directory to write (manifest.json + verifier.joblib)"),
    seed: int = typer.Option(0, "--seed", help="Split seed"),
    fractions: str = typer.Option("0.7,0.1,0.2", "--split", help="train,calibration,evaluation fractions"),
    top_k: int = typer.Option(5, "--top-k", help="Candidates retrieved and scored per query"),
    search: str = typer.Option("hnswlib", "--search", help="exact, usearch, hnswlib or faiss"),
    model: str = typer.Option("hgb", "--model", help="hgb (gradient-boosted trees) or logreg"),
    target_precision: float = typer.Option(0.99, "--target-precision", help="Calibrate the threshold for this"),
    calibrate_on: str = typer.Option("mixed", "--calibrate-on", help="mixed (all calibration pairs, hard negatives "
                                     "included) or duplicates (only duplicate pairs: GPTCache's setting)"),
    limit: int = typer.Option(0, "--limit", help="Use a sample of N pairs (fixed seed) before splitting; 0 = all"),
    max_train: int = typer.Option(0, "--max-train", help="Train on at most N of the train split's pairs; 0 = all"),
    cache_sizes: str = typer.Option("0", "--cache-sizes",
                                    help="Train on several caches of these sizes, cycled (comma list, e.g. "
                                    "1000,2000,4000,8000,16000), so the verifier sees sparse and dense namespaces; "
                                    "0 = one cache of the whole train split"),
    features_version: int = typer.Option(1, "--features-version", help="Feature set: 1, or 2 (adds features "
                                         "comparing a candidate with the query's other candidates)"),
    embedder: str = EMBEDDER_OPT,
    batch_size: int = typer.Option(64, "--batch-size", help="Embedding batch size"),
    cache_dir: Path = CACHE_DIR_OPT,
    no_disk_cache: bool = NO_DISK_OPT,
    as_json: bool = typer.Option(False, "--json", help="Print the manifest and calibration sweep as JSON"),
) -> None:
    """Train the verifier on a split sharing no text with the evaluation pairs; calibrate its threshold."""
    from margin.cache_eval.evaluate import sample_pairs
    from margin.cache_eval.verified import train

    try:
        fr = tuple(float(x) for x in fractions.split(","))
    except ValueError:
        fail(f"--split must be three comma-separated fractions, not {fractions!r}")
        raise
    if len(fr) != 3 or abs(sum(fr) - 1) > 1e-6 or min(fr) <= 0:
        fail(f"--split must be three positive fractions summing to 1, not {fractions!r}")
    if model not in ("hgb", "logreg"):
        fail(f"--model must be hgb or logreg, not {model!r}")
    if not 0.0 < target_precision <= 1.0:
        fail("--target-precision must be in (0, 1]")
    if calibrate_on not in ("mixed", "duplicates"):
        fail(f"--calibrate-on must be mixed or duplicates, not {calibrate_on!r}")
    if top_k < 1:
        fail("--top-k must be >= 1")
    try:
        sizes = [int(x) for x in cache_sizes.split(",") if x.strip()]
    except ValueError:
        fail(f"--cache-sizes must be a comma list of integers, not {cache_sizes!r}")
        raise
    if sizes == [0]:
        sizes = []
    from margin.cache_eval.features import SUPPORTED_VERSIONS

    if features_version not in SUPPORTED_VERSIONS:
        fail(f"--features-version must be one of {', '.join(map(str, SUPPORTED_VERSIONS))}, not {features_version}")
    if any(n < 2 for n in sizes):
        fail(f"--cache-sizes must be integers >= 2 (or 0 for one cache), not {cache_sizes!r}")
    _check_search(search)
    data = sample_pairs(_load(pairs), limit or None, seed)
    enc = _encoder(embedder, batch_size, None if no_disk_cache else cache_dir)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    _, report = train(data, enc, out, seed=seed, fractions=(fr[0], fr[1], fr[2]), top_k=top_k, search=search,
                      kind=model, target_precision=target_precision, max_train=max_train,
                      sampled=(limit, seed) if limit else (0, 0), cache_sizes=sizes,
                      features_version=features_version, calibrate_on=calibrate_on, log=log)
    if as_json:
        print_json(report)
        return
    m = report["manifest"]
    print_table([{"split": k, "pairs": v} for k, v in m["split"].items() if isinstance(v, int)], "split")
    c = m["calibration"]["chosen"]
    console.print(f"wrote {out}: {m['estimator']} on {m['training']['rows']} rows; threshold "
                  f"{m['threshold']} for precision >= {target_precision} on the calibration split "
                  f"({c if c else 'not reached'})")


@app.command("bench-ann")
def bench_ann_cmd(
    pairs: Path = typer.Option(..., "--pairs", help=PAIRS_HELP),
    limit: int = typer.Option(0, "--limit", help="Sample at most N pairs; 0 = all"),
    top_k: int = typer.Option(5, "--top-k", help="Neighbours per query"),
    kinds: str = typer.Option("exact,usearch,hnswlib,faiss", "--search", help="Comma list to compare"),
    embedder: str = EMBEDDER_OPT,
    cache_dir: Path = CACHE_DIR_OPT,
    as_json: bool = typer.Option(False, "--json", help="Print JSON"),
) -> None:
    """Build and query time and recall against exact search, on the pairs' real embeddings."""
    from margin.cache_eval.ann import bench
    from margin.cache_eval.evaluate import sample_pairs

    wanted = tuple(k.strip() for k in kinds.split(",") if k.strip())
    for k in wanted:
        _check_search(k)
    data = sample_pairs(_load(pairs), limit or None, 0)
    enc = _encoder(embedder, 64, cache_dir)
    entries = enc.encode(sorted({p.text_a for p in data}))
    queries = enc.encode([p.text_b for p in data])
    rows = bench(entries, queries, top_k, wanted)
    if as_json:
        print_json({"results": rows, "model": enc.name})
        return
    print_table(rows, f"{len(entries)} entries, {len(queries)} queries, top-{top_k}")


@app.command("export-onnx")
def export_onnx_cmd(
    out: Path = typer.Option(Path(".margin/models/all-MiniLM-L6-v2.onnx"), "--out", help="ONNX file to write"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON"),
) -> None:
    """Export all-MiniLM-L6-v2 (mean pooling and normalisation included) to ONNX, offline."""
    from margin.cache_eval.embed import EmbeddingError
    from margin.cache_eval.onnx_embed import export_onnx

    try:
        path = export_onnx(out)
    except EmbeddingError as e:
        fail(str(e))
        raise
    info = {"path": str(path), "bytes": path.stat().st_size}
    if as_json:
        print_json(info)
    else:
        console.print(f"wrote {path} ({info['bytes']:,} bytes)")
