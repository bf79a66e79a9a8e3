"""The semantic cache's pure decisions (what is embedded, the context hash, serve or not) and its
in-process store (namespaces, TTL, LRU bounds): and never an entry served across tenants."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from margin.cache_eval.embed import Matrix, normalise
from margin.domain import Attribution
from margin.policy import cache as cp
from margin.policy import semantic as sp
from margin.state.cache import CachedAnswer
from margin.state.semantic import SemanticStore

DIM = 64


class BagOfWords:
    """Deterministic stand-in for MiniLM: hashed word counts, so shared words mean high cosine."""

    name = "bag-of-words"

    def encode(self, texts: Sequence[str]) -> Matrix:
        out = np.zeros((len(texts), DIM), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in t.lower().split():
                out[i, int(hashlib.md5(w.encode()).hexdigest(), 16) % DIM] += 1.0
            out[i, 0] += 1e-3  # no zero rows
        return normalise(out)


def chat(last: Any, system: str = "be brief", **extra: Any) -> dict[str, Any]:
    return {"model": "m", "temperature": 0, **extra,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": last}]}


def test_last_user_text() -> None:
    assert sp.last_user_text(chat("  hello there ")) == "hello there"
    assert sp.last_user_text(chat([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}])) == "a\nb"
    assert sp.last_user_text(chat([{"type": "image_url", "image_url": {"url": "x"}}])) is None  # unseen by the model
    assert sp.last_user_text(chat("   ")) is None
    assert sp.last_user_text({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}) \
        is None
    assert sp.last_user_text({"messages": []}) is None and sp.last_user_text({}) is None


def test_context_hash_covers_everything_but_the_last_user_turn() -> None:
    h = sp.context_hash("chat", "m", chat("what is x"), "t")
    assert h == sp.context_hash("chat", "m", chat("what's x?"), "t")  # only the embedded text differs
    assert h == sp.context_hash("chat", "m", chat("what is x", user="ana", metadata={"a": 1}), "t")
    assert h != sp.context_hash("chat", "m", chat("what is x", system="be verbose"), "t")
    assert h != sp.context_hash("chat", "other-model", chat("what is x"), "t")
    assert h != sp.context_hash("chat", "m", chat("what is x"), "t2")
    assert h != sp.context_hash("chat", "m", chat("what is x", max_tokens=5), "t")
    assert h != sp.context_hash("chat", "m", chat("what is x", stream=True), "t")
    assert h != sp.context_hash("chat", "m", chat("what is x", tools=[{"type": "function"}]), "t")
    earlier = chat("what is x")
    earlier["messages"][1:1] = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert h != sp.context_hash("chat", "m", earlier, "t")


def test_key_only_for_short_chat_text() -> None:
    assert sp.key("chat", "m", chat("q"), "t", 100) is not None
    assert sp.key("completion", "m", {"prompt": "q"}, "t", 100) is None
    assert sp.key("chat", "m", chat("x" * 101), "t", 100) is None  # MiniLM would truncate it


def test_same_words() -> None:
    assert sp.same_words("How do I learn Python?", "how do i learn python")
    assert not sp.same_words("How do I learn Python?", "How do I learn Java?")


def test_choose() -> None:
    assert sp.choose([], 0.5) is None
    assert sp.choose([0.2, 0.9, 0.7], 0.5) == 1
    assert sp.choose([0.2, 0.4], 0.5) is None
    assert sp.choose([0.9, 0.9], 0.9) == 0  # inclusive, ties to the nearest


def answer(text: str) -> CachedAnswer:
    return CachedAnswer("m", body=text, output_tokens=3)


def test_store_namespaces_ttl_and_lru() -> None:
    enc = BagOfWords()
    s = SemanticStore(DIM, max_entries=5, max_entries_per_tenant=3)
    v = enc.encode(["what is the capital of france", "tell me a joke"])
    s.add("t1", "c1", "what is the capital of france", v[0], answer("paris"), ttl_s=10, now=0)
    found = s.search("t1", "c1", v[0], 3, now=1)
    assert [(e.answer.body, round(sim, 4)) for e, sim in found] == [("paris", 1.0)]
    assert s.search("t1", "other-context", v[0], 3, now=1) == []
    assert s.search("t2", "c1", v[0], 3, now=1) == []
    assert s.search("t1", "c1", v[0], 3, now=10) == [] and len(s) == 0  # expired, and dropped
    # Same text again replaces the entry instead of adding a second.
    s.add("t1", "c1", "q", v[1], answer("a"), 10, 0)
    s.add("t1", "c1", "q", v[1], answer("b"), 10, 0)
    assert len(s) == 1 and s.search("t1", "c1", v[1], 5, 1)[0][0].answer.body == "b"
    # Per-tenant bound: the least recently used of the tenant goes first; using an entry keeps it.
    for i in range(3):
        s.add("t1", "c1", f"q{i}", v[1], answer(str(i)), 10, 0)
    assert s.tenant_size("t1") == 3
    bodies = {e.answer.body for e, _ in s.search("t1", "c1", v[1], 5, 1)}
    assert bodies == {"0", "1", "2"}
    s.used(next(e for e, _ in s.search("t1", "c1", v[1], 5, 1) if e.answer.body == "0"))
    s.add("t1", "c1", "q3", v[1], answer("3"), 10, 0)
    assert {e.answer.body for e, _ in s.search("t1", "c1", v[1], 5, 1)} == {"0", "2", "3"}
    # Global bound across tenants.
    for i in range(3):
        s.add("t2", "c1", f"r{i}", v[1], answer(f"r{i}"), 10, 0)
    assert len(s) == 5 and s.tenant_size("t1") == 2
    assert s.expire(now=100) == 5 and len(s) == 0


@settings(max_examples=150, deadline=None)
@given(entries=st.lists(st.tuples(st.sampled_from(["acme", "globex", "a/b", "a"]), st.sampled_from(["x", "y", ""]),
                                  st.sampled_from(["k1", "k2"]),
                                  st.sampled_from(["what is margin", "what is a cache", "define margin please",
                                                   "how do budgets work"])), min_size=1, max_size=12),
       asker=st.tuples(st.sampled_from(["acme", "globex", "a/b", "a"]), st.sampled_from(["x", "y", ""]),
                       st.sampled_from(["k1", "k2"])),
       question=st.sampled_from(["what is margin", "what is margin?", "how do budgets work", "define a cache"]),
       scope=st.sampled_from(["org", "team", "key"]))
def test_no_cross_tenant_hit(entries: list[tuple[str, str, str, str]], asker: tuple[str, str, str], question: str,
                             scope: str) -> None:
    """Whatever the tenants store, a lookup only ever returns entries of the asker's own tenant."""
    enc = BagOfWords()
    s = SemanticStore(DIM)
    owner: dict[str, str] = {}
    for org, team, key_id, text in entries:
        t = cp.tenant(Attribution(org=org, team=team, key_id=key_id), scope)
        k = sp.key("chat", "m", chat(text), t, 1000)
        assert k is not None
        e = s.add(k.tenant, k.context, k.text, enc.encode([k.text])[0], answer(t), 60, 0)
        owner[str(e.id)] = t
    me = cp.tenant(Attribution(org=asker[0], team=asker[1], key_id=asker[2]), scope)
    k = sp.key("chat", "m", chat(question), me, 1000)
    assert k is not None
    found = s.search(k.tenant, k.context, enc.encode([k.text])[0], 10, 1)
    assert all(e.answer.body == me and e.tenant == me for e, _ in found)
    mine = {text for org, team, key_id, text in entries
            if cp.tenant(Attribution(org=org, team=team, key_id=key_id), scope) == me}
    assert {e.text for e, _ in found} <= mine
    if mine:  # and the asker's own entries are reachable (the isolation is not by refusing everything)
        assert found


def test_store_rejects_bad_bounds() -> None:
    with pytest.raises(ValueError):
        SemanticStore(DIM, max_entries=0)


def test_namespace_grows_and_reuses_deleted_slots() -> None:
    rng = np.random.default_rng(0)
    vecs = normalise(rng.normal(size=(300, DIM)))
    s = SemanticStore(DIM, max_entries=1000, max_entries_per_tenant=100)
    for i in range(300):  # past the index's first capacity (64), with evictions from 100 on
        s.add("t", "c", f"q{i}", vecs[i], answer(str(i)), 60, 0)
    assert s.tenant_size("t") == 100
    for i in (0, 150, 199, 200, 299):
        found = s.search("t", "c", vecs[i], 1, 1)
        if i < 200:
            assert not found or found[0][0].answer.body != str(i)  # evicted
        else:
            assert found[0][0].answer.body == str(i) and found[0][1] > 0.999


def test_responses_calls_have_their_own_namespace() -> None:
    a = sp.key("response", "m", {"input": "What is the capital of France?"}, "t", 500)
    b = sp.key("response", "m", {"input": [{"role": "user", "content": [
        {"type": "input_text", "text": "what's France's capital"}]}]}, "t", 500)
    c = sp.key("chat", "m", {"messages": [{"role": "user", "content": "What is the capital of France?"}]}, "t", 500)
    assert a is not None and b is not None and c is not None
    assert (a.text, b.text) == ("What is the capital of France?", "what's France's capital")
    assert a.context == b.context != c.context  # a string input is one user turn; chat is another namespace
    other = sp.key("response", "m", {"input": "What is the capital of France?", "instructions": "terse"}, "t", 500)
    assert other is not None and other.context != a.context
    assert sp.key("response", "m", {"input": [{"type": "function_call_output", "output": "x"}]}, "t", 500) is None
