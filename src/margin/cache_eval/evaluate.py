"""Semantic-cache threshold evaluation with GPTCache's benchmark counting.

Every `text_a` (GPTCache: `origin`) is a cache entry; every `text_b` (`similar`) is a query. The
query is answered by its nearest entry (cosine similarity of normalised MiniLM embeddings, exact
brute-force search in numpy). At a threshold t a query is

- a *correct hit* if the nearest entry has similarity >= t, is its own pair's entry, and the pair
  is a duplicate;
- a *wrong hit* if the nearest entry has similarity >= t but is another pair's entry, or is its own
  entry for a non-duplicate pair;
- a *miss* if no entry reaches t.

precision = correct / (correct + wrong); recall = correct / number of duplicate pairs. Identical
`text_a` strings are stored once (one cache entry per distinct text), so a pair's "own entry" is
the entry holding its `text_a`.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from margin.cache_eval.embed import Encoder, Matrix

DEFAULT_THRESHOLDS = "0.5:0.99:0.01"

# GPTCache's published result (all-MiniLM-L6-v2-style ONNX embedding, 999 paraphrase pairs).
GPTCACHE_PAIRS = 999
GPTCACHE_TABLE: tuple[dict[str, float | int], ...] = (
    {"threshold": 0.95, "correct_hits": 425, "wrong_hits": 25, "misses": 549},
    {"threshold": 0.8, "correct_hits": 904, "wrong_hits": 92, "misses": 3},
)


@dataclass(frozen=True, slots=True)
class Pair:
    text_a: str
    text_b: str
    label: int  # 1 = duplicate (paraphrase), 0 = not


@dataclass(frozen=True, slots=True)
class SweepRow:
    threshold: float
    hits: int
    correct_hits: int
    wrong_hits: int
    misses: int
    precision: float | None  # None when nothing is served
    recall: float


@dataclass(slots=True)
class EvalResult:
    sweep: list[SweepRow]
    chosen: SweepRow | None
    target_precision: float
    model: str
    pairs: int
    duplicates: int
    entries: int
    queries_per_s: float
    timings_s: dict[str, float] = field(default_factory=dict)
    search: str = "exact brute-force cosine (numpy dot product over normalised embeddings)"
    decision: str = "cosine"  # or "verifier": what the threshold applies to
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "sweep": [asdict(r) for r in self.sweep],
            "chosen": asdict(self.chosen) if self.chosen else None,
            "target_precision": self.target_precision,
            "queries_per_s": round(self.queries_per_s, 1),
            "model": self.model,
            "pairs": self.pairs,
            "duplicates": self.duplicates,
            "entries": self.entries,
            "search": self.search,
            "decision": self.decision,
            "timings_s": {k: round(v, 3) for k, v in self.timings_s.items()},
            "gptcache_comparison": gptcache_comparison(self.sweep),
            **self.extra,
        }


# ----------------------------------------------------------------------------- data


def _json_from_tar(tar: tarfile.TarFile, path: Path) -> Any:
    """The one .json file a (gzip) tar holds, as GPTCache ships its benchmark data."""
    members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".json")]
    if len(members) != 1:
        raise ValueError(f"{path}: expected one .json file in the tar, found {len(members)}")
    f = tar.extractfile(members[0])
    if f is None:
        raise ValueError(f"{path}: cannot read {members[0].name}")
    return json.load(f)


def _read_json_bytes(path: Path) -> Any:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        buf = io.BytesIO(raw)
        if tarfile.is_tarfile(buf):
            buf.seek(0)
            with tarfile.open(fileobj=buf, mode="r:*") as tar:
                return _json_from_tar(tar, path)
        return json.loads(gzip.decompress(raw))
    if tarfile.is_tarfile(path):
        with tarfile.open(path) as tar:
            return _json_from_tar(tar, path)
    return json.loads(raw)


def parse_pairs(data: Any) -> list[Pair]:
    """QQP-style `{text_a, text_b, label}` rows or GPTCache-style `{origin, similar}` (all duplicates)."""
    if isinstance(data, dict):
        for key in ("pairs", "data", "rows"):
            if isinstance(data.get(key), list):
                data = data[key]
                break
    if not isinstance(data, list):
        raise ValueError("expected a JSON list of pairs")
    out: list[Pair] = []
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise ValueError(f"row {i}: expected an object")
        if "text_a" in row and "text_b" in row:
            out.append(Pair(str(row["text_a"]), str(row["text_b"]), int(row.get("label", 1))))
        elif "origin" in row and "similar" in row:
            out.append(Pair(str(row["origin"]), str(row["similar"]), 1))
        else:
            raise KeyError(f"row {i}: needs text_a/text_b[/label] or origin/similar")
    return out


def load_pairs(path: str | Path) -> list[Pair]:
    """Read pairs from JSON, gzip JSON, or a (gzip) tar holding one JSON file."""
    return parse_pairs(_read_json_bytes(Path(path)))


def sample_pairs(pairs: Sequence[Pair], limit: int | None, seed: int = 0) -> list[Pair]:
    """At most `limit` pairs drawn without replacement with a fixed seed (original order kept)."""
    if limit is None or limit <= 0 or limit >= len(pairs):
        return list(pairs)
    idx = np.sort(np.random.default_rng(seed).choice(len(pairs), size=limit, replace=False))
    return [pairs[int(i)] for i in idx]


def parse_thresholds(spec: str) -> list[float]:
    """`start:stop:step` (stop included) or a comma list, e.g. `0.5:0.99:0.01` or `0.8,0.9,0.95`."""
    spec = spec.strip()
    if ":" in spec:
        parts = [float(p) for p in spec.split(":")]
        if len(parts) != 3 or parts[2] <= 0 or parts[1] < parts[0]:
            raise ValueError(f"bad threshold range {spec!r}; want start:stop:step with step > 0")
        start, stop, step = parts
        n = int(np.floor((stop - start) / step + 1e-9)) + 1
        values = [round(start + i * step, 6) for i in range(n)]
    else:
        values = sorted({float(p) for p in spec.split(",") if p.strip()})
    if not values or any(not -1.0 <= v <= 1.0 for v in values):
        raise ValueError(f"thresholds must be cosine similarities in [-1, 1]: {spec!r}")
    return values


# ----------------------------------------------------------------------------- search and counting


def nearest(entries: Matrix, queries: Matrix, chunk: int = 2048) -> tuple[npt.NDArray[np.int64], Matrix]:
    """Top-1 entry index and cosine similarity per query (exact; rows must be normalised)."""
    n = queries.shape[0]
    idx = np.empty(n, dtype=np.int64)
    sim = np.empty(n, dtype=np.float32)
    if entries.shape[0] == 0:
        idx.fill(-1)
        sim.fill(-np.inf)
        return idx, sim
    for s in range(0, n, chunk):
        scores = queries[s : s + chunk] @ entries.T
        best = np.argmax(scores, axis=1)
        idx[s : s + chunk] = best
        sim[s : s + chunk] = scores[np.arange(scores.shape[0]), best]
    return idx, sim


def sweep(
    best_idx: npt.NDArray[np.int64],
    best_sim: npt.NDArray[np.float32],
    own_idx: npt.NDArray[np.int64],
    labels: npt.NDArray[np.int64],
    thresholds: Sequence[float],
) -> list[SweepRow]:
    """Count correct hits, wrong hits and misses at each threshold (GPTCache's counting)."""
    right_entry = (best_idx == own_idx) & (labels == 1)
    n_dup = int((labels == 1).sum())
    rows: list[SweepRow] = []
    for t in thresholds:
        served = best_sim >= np.float32(t)
        hits = int(served.sum())
        correct = int((served & right_entry).sum())
        wrong = hits - correct
        rows.append(SweepRow(
            threshold=float(t), hits=hits, correct_hits=correct, wrong_hits=wrong,
            misses=int(served.size - hits),
            precision=round(correct / hits, 6) if hits else None,
            recall=round(correct / n_dup, 6) if n_dup else 0.0,
        ))
    return rows


def wilson_lower(correct: int, hits: int, z: float) -> float:
    """Lower end of the Wilson score interval for a proportion (z = 1.645: one-sided 95%)."""
    if hits == 0:
        return 0.0
    p = correct / hits
    d = 1 + z * z / hits
    centre = p + z * z / (2 * hits)
    margin = z * float(np.sqrt(p * (1 - p) / hits + z * z / (4 * hits * hits)))
    return (centre - margin) / d


def choose_threshold(rows: Sequence[SweepRow], target_precision: float, z: float = 0.0) -> SweepRow | None:
    """The lowest threshold from which precision stays at or above the target at every higher
    threshold that serves anything. (Not merely the lowest that reaches it: precision is not
    monotone in the threshold, and a lucky dip must not be chosen below a stretch that misses.)
    With z > 0 (calibration on a small split): the lowest threshold whose precision's Wilson lower
    bound reaches the target - the bound already allows for noise, and 2 correct out of 2 hits
    does not pass for 99% precision."""
    if z > 0:
        ok = [r for r in rows if r.hits and wilson_lower(r.correct_hits, r.hits, z) >= target_precision]
        return min(ok, key=lambda r: r.threshold) if ok else None
    chosen: SweepRow | None = None
    for r in sorted(rows, key=lambda r: r.threshold, reverse=True):
        if r.precision is None:
            continue
        if r.precision < target_precision:
            break
        chosen = r
    return chosen


def at_recall(rows: Sequence[SweepRow], recall: float) -> SweepRow | None:
    """The highest threshold whose recall is still >= `recall` (fewest wrong hits at that recall)."""
    ok = [r for r in rows if r.recall >= recall - 1e-6]  # rows' recall is rounded to 6 decimals
    return max(ok, key=lambda r: r.threshold) if ok else None


def gptcache_comparison(rows: Sequence[SweepRow]) -> list[dict[str, Any]]:
    """For each GPTCache published point: our row at the same recall, wrong hits per 999 queries
    against GPTCache's, and whether the issue's target (at most half the wrong hits) is met."""
    out: list[dict[str, Any]] = []
    n_queries = rows[0].hits + rows[0].misses if rows else 0
    for g in GPTCACHE_TABLE:
        g_correct = float(g["correct_hits"])
        g_recall = g_correct / GPTCACHE_PAIRS
        g_wrong_rate = float(g["wrong_hits"]) / GPTCACHE_PAIRS
        ours = at_recall(rows, g_recall)
        entry: dict[str, Any] = {
            "gptcache_threshold": g["threshold"], "gptcache_recall": round(g_recall, 4),
            "gptcache_wrong_per_999": g["wrong_hits"],
            "gptcache_precision": round(g_correct / (g_correct + float(g["wrong_hits"])), 4),
        }
        if ours is None or n_queries == 0:
            entry.update({"threshold": None, "met": False, "note": "recall not reached in the sweep"})
        else:
            wrong_999 = ours.wrong_hits / n_queries * GPTCACHE_PAIRS
            entry.update({
                "threshold": ours.threshold, "recall": ours.recall, "precision": ours.precision,
                "wrong_per_999": round(wrong_999, 1),
                "met": wrong_999 <= g_wrong_rate * GPTCACHE_PAIRS / 2,
            })
        out.append(entry)
    return out


def evaluate(
    pairs: Sequence[Pair],
    encoder: Encoder,
    thresholds: Sequence[float],
    target_precision: float = 0.99,
) -> EvalResult:
    """Embed entries and queries, search, sweep the thresholds, choose the operating threshold."""
    if not pairs:
        raise ValueError("no pairs to evaluate")
    texts: dict[str, int] = {}
    own = np.empty(len(pairs), dtype=np.int64)
    for i, p in enumerate(pairs):
        own[i] = texts.setdefault(p.text_a, len(texts))
    labels = np.array([p.label for p in pairs], dtype=np.int64)

    t0 = time.perf_counter()
    entries = encoder.encode(list(texts))
    t1 = time.perf_counter()
    queries = encoder.encode([p.text_b for p in pairs])
    t2 = time.perf_counter()
    best_idx, best_sim = nearest(entries, queries)
    t3 = time.perf_counter()
    rows = sweep(best_idx, best_sim, own, labels, thresholds)
    t4 = time.perf_counter()

    query_s = (t2 - t1) + (t3 - t2)
    return EvalResult(
        sweep=rows, chosen=choose_threshold(rows, target_precision), target_precision=target_precision,
        model=getattr(encoder, "name", type(encoder).__name__), pairs=len(pairs),
        duplicates=int((labels == 1).sum()), entries=len(texts),
        queries_per_s=len(pairs) / query_s if query_s > 0 else float("inf"),
        timings_s={"embed_entries": t1 - t0, "embed_queries": t2 - t1, "search": t3 - t2, "sweep": t4 - t3},
    )
