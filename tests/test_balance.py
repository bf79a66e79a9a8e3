"""policy/balance.py: which replica of a self-hosted pool serves a request (pure; hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from margin.policy.balance import ReplicaLoad, affinity_key, choose, rendezvous

NAMES = [f"r{i}" for i in range(6)]

replica = st.builds(
    ReplicaLoad,
    name=st.just(""),
    status=st.sampled_from(["up", "unknown", "down"]),
    waiting=st.integers(0, 50).map(float),
    running=st.integers(0, 50).map(float),
    kv_usage=st.one_of(st.none(), st.floats(0, 1)),
    sent_since_scrape=st.integers(0, 10),
    done_since_scrape=st.integers(0, 10),
    inflight=st.integers(0, 10),
    slots=st.one_of(st.none(), st.integers(1, 8)),
)
pools = st.lists(replica, min_size=1, max_size=6).map(
    lambda rs: [ReplicaLoad(NAMES[i], *[getattr(r, f) for f in ReplicaLoad.__slots__[1:]]) for i, r in enumerate(rs)])
keys = st.one_of(st.none(), st.text(min_size=1, max_size=20))


def _load(pool: list[ReplicaLoad], name: str) -> float:
    return next(r.load for r in pool if r.name == name)


@settings(max_examples=300, deadline=None)
@given(pools, keys, st.floats(0, 10), st.integers(0, 1000))
def test_never_a_down_replica_while_another_serves(pool: list[ReplicaLoad], key: str | None, slack: float,
                                                   turn: int) -> None:
    for strategy in ("least-loaded", "round-robin"):
        c = choose(pool, strategy=strategy, key=key, slack=slack, turn=turn)  # type: ignore[arg-type]
        live = [r.name for r in pool if r.status != "down"]
        assert c.replica in (live or [r.name for r in pool])


@settings(max_examples=300, deadline=None)
@given(pools, keys, st.floats(0, 10), st.integers(0, 1000))
def test_least_loaded_within_slack(pool: list[ReplicaLoad], key: str | None, slack: float, turn: int) -> None:
    """The chosen replica is never more than `slack` requests busier than the least-loaded one,
    and without affinity it is the least loaded."""
    live = [r for r in pool if r.status != "down"] or pool
    least = min(r.load for r in live)
    c = choose(pool, key=key, slack=slack, turn=turn)
    assert _load(pool, c.replica) <= least + slack + 1e-9
    c = choose(pool, key=key, affinity=False, turn=turn)
    assert _load(pool, c.replica) == least
    assert not c.affinity


@settings(max_examples=200, deadline=None)
@given(pools, st.text(min_size=1, max_size=20), st.integers(0, 1000), st.integers(0, 1000))
def test_affinity_is_stable_for_a_conversation(pool: list[ReplicaLoad], key: str, t1: int, t2: int) -> None:
    """Same key, same loads: the same replica, whatever the request counter says."""
    assert choose(pool, key=key, turn=t1).replica == choose(pool, key=key, turn=t2).replica


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=60, unique=True),
       st.integers(2, 6), st.integers(0, 5))
def test_rendezvous_moves_only_the_removed_replicas_keys(keys_: list[str], n: int, gone: int) -> None:
    names = NAMES[:n]
    gone_name = names[gone % n]
    rest = [x for x in names if x != gone_name]
    for k in keys_:
        before, after = rendezvous(k, names)[0], rendezvous(k, rest)[0]
        if before != gone_name:
            assert after == before  # only the removed replica's conversations move


def test_least_loaded_with_known_load() -> None:
    pool = [ReplicaLoad("a", "up", waiting=4, running=2), ReplicaLoad("b", "up", waiting=0, running=1)]
    c = choose(pool)
    assert (c.replica, c.load) == ("b", 1.0)
    # margin sent 6 more to b since that scrape (none finished): b now holds 7, more than a's 6
    pool[1] = ReplicaLoad("b", "up", waiting=0, running=1, sent_since_scrape=6)
    assert choose(pool).replica == "a"
    # KV usage breaks a tie
    tie = [ReplicaLoad("a", "up", running=2, kv_usage=0.9), ReplicaLoad("b", "up", running=2, kv_usage=0.2)]
    assert choose(tie).replica == "b"


def test_unknown_load_uses_margins_own_inflight() -> None:
    pool = [ReplicaLoad("a", "unknown", waiting=99, inflight=1), ReplicaLoad("b", "up", running=3)]
    c = choose(pool)
    assert c.replica == "a" and c.load == 1  # stale scraped numbers of an unreadable replica are ignored


def test_all_down_still_chooses() -> None:
    pool = [ReplicaLoad("a", "down"), ReplicaLoad("b", "down")]
    c = choose(pool, turn=3)
    assert c.replica in ("a", "b") and "all replicas down" in c.why


def test_affinity_yields_to_a_much_busier_replica() -> None:
    key = "run:case-1"
    pref = rendezvous(key, ["a", "b"])[0]
    other = "b" if pref == "a" else "a"
    pool = [ReplicaLoad(pref, "up", running=3), ReplicaLoad(other, "up", running=1)]
    c = choose(pool, key=key, slack=2)
    assert c.replica == pref and c.affinity  # 3 <= 1 + 2: the warm cache wins
    pool = [ReplicaLoad(pref, "up", running=4), ReplicaLoad(other, "up", running=1)]
    c = choose(pool, key=key, slack=2)
    assert c.replica == other and not c.affinity and f"affinity replica {pref} busier" in c.why


def test_affinity_never_queues_a_request_another_replica_would_start() -> None:
    """llama.cpp with 2 slots: the affinity replica has both busy, the other one is idle. Within
    the slack of 2, but the request would wait for a slot there: it goes to the idle replica."""
    key = "chat:abc"
    pref = rendezvous(key, ["a", "b"])[0]
    other = "b" if pref == "a" else "a"
    pool = [ReplicaLoad(pref, "up", running=2, slots=2), ReplicaLoad(other, "up", slots=2)]
    c = choose(pool, key=key, slack=2)
    assert c.replica == other and f"affinity replica {pref} full" in c.why
    pool = [ReplicaLoad(pref, "up", running=1, slots=2), ReplicaLoad(other, "up", slots=2)]
    assert choose(pool, key=key, slack=2).replica == pref  # a free slot: the warm cache wins
    vllm = [ReplicaLoad(pref, "up", running=3, waiting=1), ReplicaLoad(other, "up", running=3)]
    assert choose(vllm, key=key, slack=2).replica == other  # vLLM queueing: same rule
    both = [ReplicaLoad(pref, "up", running=2, waiting=1), ReplicaLoad(other, "up", running=2, waiting=1)]
    assert choose(both, key=key, slack=2).replica == pref  # it would queue anywhere: keep the cache


def test_round_robin_rotates_over_live_replicas() -> None:
    pool = [ReplicaLoad("a", "up"), ReplicaLoad("b", "down"), ReplicaLoad("c", "up")]
    assert [choose(pool, strategy="round-robin", turn=t).replica for t in range(4)] == ["a", "c", "a", "c"]


def test_equal_loads_without_key_spread_by_turn() -> None:
    pool = [ReplicaLoad("a", "up"), ReplicaLoad("b", "up"), ReplicaLoad("c", "up")]
    assert {choose(pool, turn=t).replica for t in range(3)} == {"a", "b", "c"}


def test_affinity_key_of_a_conversation() -> None:
    sys_ = {"role": "system", "content": "You are a support agent for ACME."}
    turn1 = [sys_, {"role": "user", "content": "My order is late."}]
    turn3 = [*turn1, {"role": "assistant", "content": "Sorry!"}, {"role": "user", "content": "Where is it?"}]
    other = [sys_, {"role": "user", "content": "Cancel my plan."}]
    k = affinity_key("chat", {"messages": turn1})
    assert k is not None and k == affinity_key("chat", {"messages": turn3})
    assert k != affinity_key("chat", {"messages": other})
    assert affinity_key("chat", {"messages": turn1}, run_id="case-9") == "run:case-9"
    parts = [sys_, {"role": "user", "content": [{"type": "text", "text": "My order is late."}]}]
    assert affinity_key("chat", {"messages": parts}) == k  # content parts hash like plain text
    assert affinity_key("embedding", {"input": "x"}) is None
    assert affinity_key("completion", {"prompt": "abc"}) == affinity_key("completion", {"prompt": ["abc"]})


def test_empty_pool_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least one replica"):
        choose([])
