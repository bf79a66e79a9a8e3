"""Semantic-cache evaluation and its learned verifier (docs/caching.md).

embed / onnx_embed: all-MiniLM-L6-v2 offline (sentence-transformers, or ONNX Runtime); disk: the
on-disk embedding cache; ann: exact and HNSW search (usearch, hnswlib, faiss) and their benchmark;
evaluate: GPTCache's counting and the threshold sweep; features / verifier / verified / artefact:
the verifier that decides whether a retrieved entry answers the query, trained and calibrated on a
split sharing no text with the evaluation, saved as a versioned artefact; plots: the curves.
"""

from margin.cache_eval.evaluate import (
    EvalResult,
    Pair,
    SweepRow,
    choose_threshold,
    evaluate,
    load_pairs,
    nearest,
    parse_thresholds,
    sample_pairs,
    sweep,
)

__all__ = [
    "EvalResult",
    "Pair",
    "SweepRow",
    "choose_threshold",
    "evaluate",
    "load_pairs",
    "nearest",
    "parse_thresholds",
    "sample_pairs",
    "sweep",
]
