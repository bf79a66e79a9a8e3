"""Semantic-cache evaluation: embed (MiniLM, offline), sweep similarity thresholds, choose one.

`margin cache eval` uses this to pick the lowest cosine-similarity threshold whose precision on a
paraphrase-pair data set reaches a target (GPTCache's benchmark counting; see docs/caching.md).
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
