"""Features of a (query, cached entry) pair for the semantic-cache verifier. Pure numpy.

A cosine threshold alone cannot tell "Sweden" from "Switzerland": QQP's hard negatives differ in one
entity, number or negation and embed almost identically. The verifier sees, besides the cosine:
- the embeddings' element-wise product and absolute difference (which directions differ, as in
  Sentence-BERT's classification head);
- where the candidate stands among the query's retrieved neighbours (rank, gap to the best, the
  best's lead over the second): another entry almost as close means the query is ambiguous;
- lexical evidence: word and character-trigram overlap, length ratio, and mismatched numbers,
  capitalised words (names, places), negations and question words.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import numpy.typing as npt

from margin.cache_eval.embed import Matrix

FEATURES_VERSION = 1
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


def names(dim: int) -> list[str]:
    return [*RETRIEVAL_NAMES, *LEXICAL_NAMES, *(f"prod_{i}" for i in range(dim)), *(f"absdiff_{i}" for i in range(dim))]


def pair_features(q_texts: Sequence[str], c_texts: Sequence[str], qv: Matrix, cv: Matrix,
                  cos: npt.NDArray[np.float32], rank: npt.NDArray[np.float32], best: npt.NDArray[np.float32],
                  second: npt.NDArray[np.float32]) -> Matrix:
    """One row per (query, candidate): retrieval context, lexical features, u*v and |u-v|.

    `cos`: the pair's cosine; `rank`: its place among the query's candidates (0 = nearest);
    `best`, `second`: the query's top two cosines."""
    n = len(q_texts)
    retrieval = np.stack([cos, rank, best - cos, best - second], axis=1).astype(np.float32)
    lex = np.array([lexical(q, c) for q, c in zip(q_texts, c_texts, strict=True)], dtype=np.float32).reshape(n, -1)
    return np.hstack([retrieval, lex, qv * cv, np.abs(qv - cv)]).astype(np.float32, copy=False)


def candidate_features(q_texts: Sequence[str], qv: Matrix, idx: npt.NDArray[np.int64], sims: npt.NDArray[np.float32],
                       entry_texts: Sequence[str], entries: Matrix) -> Matrix:
    """Rows for every (query i, candidate j) of a top-k search, in row-major order (n*k rows).

    `idx`, `sims`: (n, k) neighbour indices (-1 = none) and cosines, best first."""
    n, k = idx.shape
    valid = idx >= 0
    safe = np.where(valid, idx, 0)
    best = np.repeat(sims[:, 0], k)
    second = np.repeat(sims[:, 1] if k > 1 else sims[:, 0], k)
    rank = np.tile(np.arange(k, dtype=np.float32), n)
    qrep = np.repeat(np.arange(n), k)
    flat = safe.reshape(-1)
    return pair_features([q_texts[int(i)] for i in qrep], [entry_texts[int(j)] for j in flat], qv[qrep], entries[flat],
                         sims.reshape(-1), rank, best, second)
