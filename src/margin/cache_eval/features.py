"""Features of a (query, cached entry) pair for the semantic-cache verifier. Pure numpy.

A cosine threshold alone cannot tell "Sweden" from "Switzerland": QQP's hard negatives differ in one
entity, number or negation and embed almost identically. The verifier sees, besides the cosine:
- the embeddings' element-wise product and absolute difference (which directions differ, as in
  Sentence-BERT's classification head);
- where the candidate stands among the query's retrieved neighbours (rank, gap to the best, the
  best's lead over the second): another entry almost as close means the query is ambiguous;
- lexical evidence: word and character-trigram overlap, length ratio, and mismatched numbers,
  capitalised words (names, places), negations and question words;
- (version 2, optional) the candidate against the query's other candidates: how far its lexical
  overlap is from the best candidate's, and how close its nearest fellow candidate is ("twin"); the
  idea: when the own entry is not the nearest by cosine it is often the one sharing the query's
  words. An experiment: in the one training run it was tried on it did not beat version 1 on the
  inner validation split (the numbers were not kept), so version 1 stays the default.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import numpy.typing as npt

from margin.cache_eval.embed import Matrix

# Version 2 adds LISTWISE_NAMES (see the module doc): selectable with `--features-version 2`.
FEATURES_VERSION = 1
SUPPORTED_VERSIONS = (1, 2)
_WORD = re.compile(r"[A-Za-z0-9]+(?:'[A-Za-z]+)?")
_NUM = re.compile(r"\d+(?:[.,]\d+)?")
_NEG = frozenset({"not", "no", "never", "none", "nothing", "without", "cannot", "cant", "can't", "dont", "don't",
                  "doesn't", "didn't", "isn't", "aren't", "wasn't", "won't", "shouldn't", "wouldn't", "couldn't"})
_QWORDS = ("what", "how", "why", "when", "where", "which", "who", "whom", "whose", "is", "are", "can", "do",
           "does", "should", "will", "would", "could")
_STOP = frozenset(("a", "an", "the", "of", "to", "in", "on", "for", "and", "or", "is", "are", "was", "were", "be",
                   "been", "do", "does", "did", "i", "you", "my", "your", "it", "this", "that", "what", "how", "why",
                   "which", "who", "when", "where", "can", "should", "will", "would", "could", "with", "at", "by",
                   "from", "as"))

LEXICAL_NAMES: tuple[str, ...] = (
    "word_jaccard", "content_jaccard", "trigram_jaccard", "len_ratio", "words_only_q", "words_only_c",
    "num_mismatch", "num_any", "caps_mismatch", "caps_only_q", "caps_only_c", "neg_mismatch",
    "qword_same", "first_word_same", "last_word_same", "exact_lower",
)
RETRIEVAL_NAMES: tuple[str, ...] = ("cosine", "rank", "gap_to_best", "best_lead")
LISTWISE_NAMES: tuple[str, ...] = (
    "word_jaccard_vs_best", "content_jaccard_vs_best", "trigram_jaccard_vs_best", "trigram_rank",
    "caps_mismatch_vs_min", "words_differ_vs_min", "twin_cosine", "near_count", "candidates",
)
# Columns of LEXICAL_NAMES the listwise features compare across a query's candidates.
_LEX = {n: i for i, n in enumerate(LEXICAL_NAMES)}


@lru_cache(maxsize=65536)
def _parse(text: str) -> tuple[frozenset[str], frozenset[str], frozenset[str], frozenset[str], frozenset[str],
                               str, str, str, str]:
    words = _WORD.findall(text)
    lower = [w.lower() for w in words]
    # Capitalised words after the first are names, places, products ("Sweden", "iPhone", "UK").
    caps = frozenset(w.lower() for w in words[1:] if w != "I" and (w[:1].isupper() or (len(w) > 1 and w.isupper())))
    compact = " ".join(lower)
    grams = frozenset(compact[i : i + 3] for i in range(max(0, len(compact) - 2)))
    qword = next((w for w in lower if w in _QWORDS), "")
    return (frozenset(lower), frozenset(w for w in lower if w not in _STOP), grams, caps,
            frozenset(_NUM.findall(text)), qword, lower[0] if lower else "", lower[-1] if lower else "", compact)


def _jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    u = len(a | b)
    return len(a & b) / u if u else 1.0


def lexical(q: str, c: str) -> list[float]:
    """The LEXICAL_NAMES features of one pair."""
    qw, qc, qg, qcap, qn, qq, qf, ql, qs = _parse(q)
    cw, cc, cg, ccap, cn, cq, cf, cl, cs = _parse(c)
    lq, lc = len(q), len(c)
    return [
        _jaccard(qw, cw), _jaccard(qc, cc), _jaccard(qg, cg),
        min(lq, lc) / max(lq, lc) if max(lq, lc) else 1.0,
        float(len(qc - cc)), float(len(cc - qc)),
        float(qn != cn), float(bool(qn or cn)),
        # a name on one side only, in any case ("Sweden" vs "Switzerland"; not "Python" vs "python")
        float(len(qcap - cw) + len(ccap - qw)), float(len(qcap - cw)), float(len(ccap - qw)),
        float(bool(qw & _NEG) != bool(cw & _NEG)),
        float(qq == cq), float(qf == cf), float(ql == cl), float(qs == cs),
    ]


def names(dim: int, version: int = FEATURES_VERSION) -> list[str]:
    listwise = LISTWISE_NAMES if version >= 2 else ()
    return [*RETRIEVAL_NAMES, *LEXICAL_NAMES, *listwise, *(f"prod_{i}" for i in range(dim)),
            *(f"absdiff_{i}" for i in range(dim))]


def pair_features(q_texts: Sequence[str], c_texts: Sequence[str], qv: Matrix, cv: Matrix,
                  cos: npt.NDArray[np.float32], rank: npt.NDArray[np.float32], best: npt.NDArray[np.float32],
                  second: npt.NDArray[np.float32], listwise: Matrix | None = None,
                  lex: Matrix | None = None) -> Matrix:
    """One row per (query, candidate): retrieval context, lexical features, [listwise,] u*v and |u-v|.

    `cos`: the pair's cosine; `rank`: its place among the query's candidates (0 = nearest);
    `best`, `second`: the query's top two cosines."""
    retrieval = np.stack([cos, rank, best - cos, best - second], axis=1).astype(np.float32)
    if lex is None:
        lex = lexical_rows(q_texts, c_texts)
    parts = [retrieval, lex, *([] if listwise is None else [listwise]), qv * cv, np.abs(qv - cv)]
    return np.hstack(parts).astype(np.float32, copy=False)


def lexical_rows(q_texts: Sequence[str], c_texts: Sequence[str]) -> Matrix:
    n = len(q_texts)
    return np.array([lexical(q, c) for q, c in zip(q_texts, c_texts, strict=True)],
                    dtype=np.float32).reshape(n, len(LEXICAL_NAMES))


def listwise_features(lex: Matrix, cands: Matrix, sims: npt.NDArray[np.float32],
                      valid: npt.NDArray[np.bool_]) -> Matrix:
    """LISTWISE_NAMES for (n, k) candidates. `lex`: (n, k, L) lexical features; `cands`: (n, k, d)
    candidate embeddings; `sims`: (n, k) cosines to the query; `valid`: (n, k) real candidates.
    Padded slots take part in nothing (their rows are dropped or scored -1 by the caller)."""
    n, k = valid.shape
    neg, pos = np.float32(-np.inf), np.float32(np.inf)

    def vs_best(col: str) -> Matrix:
        v = lex[:, :, _LEX[col]]
        out: Matrix = v - np.max(np.where(valid, v, neg), axis=1, keepdims=True)
        return out

    def vs_min(v: Matrix) -> Matrix:
        out: Matrix = v - np.min(np.where(valid, v, pos), axis=1, keepdims=True)
        return out

    tri = np.where(valid, lex[:, :, _LEX["trigram_jaccard"]], neg)
    # rank of each candidate's trigram overlap among the query's candidates (0 = most overlap)
    tri_rank = (tri[:, None, :] > tri[:, :, None]).sum(axis=2).astype(np.float32)
    differ = lex[:, :, _LEX["words_only_q"]] + lex[:, :, _LEX["words_only_c"]]
    gram = np.einsum("nkd,nld->nkl", cands, cands)
    other = valid[:, None, :] & valid[:, :, None] & ~np.eye(k, dtype=bool)[None]
    twin = np.max(np.where(other, gram, np.float32(-1.0)), axis=2) if k > 1 else np.full((n, k), -1.0, np.float32)
    near = ((sims[:, None, :] >= sims[:, :, None] - 0.03) & other).sum(axis=2).astype(np.float32)
    count = np.repeat(valid.sum(axis=1, keepdims=True), k, axis=1).astype(np.float32)
    out = np.stack([vs_best("word_jaccard"), vs_best("content_jaccard"), vs_best("trigram_jaccard"), tri_rank,
                    vs_min(lex[:, :, _LEX["caps_mismatch"]]), vs_min(differ), twin, near, count], axis=2)
    return np.where(valid[:, :, None], out, np.float32(0.0)).astype(np.float32).reshape(n * k, len(LISTWISE_NAMES))


def candidate_features(q_texts: Sequence[str], qv: Matrix, idx: npt.NDArray[np.int64], sims: npt.NDArray[np.float32],
                       entry_texts: Sequence[str], entries: Matrix, version: int = FEATURES_VERSION) -> Matrix:
    """Rows for every (query i, candidate j) of a top-k search, in row-major order (n*k rows).

    `idx`, `sims`: (n, k) neighbour indices (-1 = none) and cosines, best first. `version`: the
    feature set (an artefact's `features_version`)."""
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(f"features version {version} is not one of {SUPPORTED_VERSIONS}")
    n, k = idx.shape
    valid = idx >= 0
    safe = np.where(valid, idx, 0)
    best = np.repeat(sims[:, 0], k)
    second = np.repeat(sims[:, 1] if k > 1 else sims[:, 0], k)
    rank = np.tile(np.arange(k, dtype=np.float32), n)
    qrep = np.repeat(np.arange(n), k)
    flat = safe.reshape(-1)
    qt, ct = [q_texts[int(i)] for i in qrep], [entry_texts[int(j)] for j in flat]
    lex = lexical_rows(qt, ct)
    listwise = None
    if version >= 2:
        listwise = listwise_features(lex.reshape(n, k, -1), entries[safe], sims, valid)
    return pair_features(qt, ct, qv[qrep], entries[flat], sims.reshape(-1), rank, best, second, listwise, lex)
