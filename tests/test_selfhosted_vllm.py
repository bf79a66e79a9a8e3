"""Self-hosted pools against a vLLM metrics stub: a small real HTTP server (its own process) that
serves vLLM's Prometheus names with loads the test sets, and OpenAI answers that say which
replica answered. The pool scrapes it, picks replicas by load and affinity, marks refusing
replicas down, and the gateway exposes /admin/pools and margin_recommended_replicas."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import pytest_asyncio

from margin.config import ProviderConfig, parse_config
from margin.providers.base import UpstreamConnectionError
from margin.providers.pool import PoolProvider
from tests.conftest import PY, Gateway, free_port, gateway_config, start_gateway, stop, wait_http

ROOT = Path(__file__).resolve().parents[1]


def _stub_main(port: int, name: str) -> None:  # pragma: no cover - runs in the stub's own process
    from aiohttp import web

    state: dict[str, Any] = {"waiting": 0.0, "running": 0.0, "kv": 0.0, "generated": 0, "served": 0,
                             "metrics_status": 200}

    async def metrics(_: web.Request) -> web.Response:
        if state["metrics_status"] != 200:
            return web.Response(status=state["metrics_status"], text="metrics unavailable")
        lines = []
        for metric, kind, value in (("vllm:num_requests_waiting", "gauge", state["waiting"]),
                                    ("vllm:num_requests_running", "gauge", state["running"]),
                                    ("vllm:gpu_cache_usage_perc", "gauge", state["kv"]),
                                    ("vllm:generation_tokens_total", "counter", state["generated"])):
            base = metric.removesuffix("_total")
            lines += [f"# HELP {base} stub", f"# TYPE {base} {kind}", f'{metric}{{model_name="m"}} {value}']
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    async def load(req: web.Request) -> web.Response:
        state.update(await req.json())
        return web.json_response(state)

    async def chat(req: web.Request) -> web.StreamResponse:
        body = await req.json()
        state["served"] += 1
        state["generated"] += 3
        usage = {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}
        if not body.get("stream"):
            return web.json_response({"id": "c1", "object": "chat.completion", "created": 0, "model": body["model"],
                                      "choices": [{"index": 0, "finish_reason": "stop",
                                                   "message": {"role": "assistant", "content": f"from {name}"}}],
                                      "usage": usage})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(req)
        for piece in ("from ", name, "."):
            chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": body["model"],
                     "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
            await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        last = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": body["model"], "choices": [],
                "usage": usage}
        await resp.write(b"data: " + orjson.dumps(last) + b"\n\ndata: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/health", lambda _: web.json_response({"ok": True}))
    app.router.add_get("/stub/state", lambda _: web.json_response(state))
    app.router.add_post("/stub/load", load)
    app.router.add_post("/v1/chat/completions", chat)
    web.run_app(app, host="127.0.0.1", port=port, print=None)  # type: ignore[arg-type]


class Stub:
    def __init__(self, name: str):
        self.name, self.port = name, free_port()
        code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
                f"from tests.test_selfhosted_vllm import _stub_main; _stub_main({self.port}, {name!r})")
        self.proc = subprocess.Popen([PY, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_http(f"{self.root}/health", proc=self.proc)

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return self.root + "/v1"

    def set(self, **load: Any) -> None:
        httpx.post(self.root + "/stub/load", json=load).raise_for_status()

    def served(self) -> int:
        return int(httpx.get(self.root + "/stub/state").json()["served"])


@pytest.fixture(scope="module")
def stubs() -> Iterator[list[Stub]]:
    ss = [Stub("a"), Stub("b"), Stub("c")]
    yield ss
    for s in ss:
        stop(s.proc)


@pytest.fixture(autouse=True)
def _reset(stubs: list[Stub]) -> None:
    for s in stubs:
        s.set(waiting=0, running=0, kv=0, metrics_status=200)


def _dead_url() -> str:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


def _cfg(urls: list[str], **pool: Any) -> ProviderConfig:
    reps = [{"base_url": u, "name": n} for u, n in zip(urls, "abcdefgh", strict=False)]
    return ProviderConfig(name="vpool", kind="vllm", replicas=reps, pool={"scrape_interval_s": 60, **pool})


@pytest_asyncio.fixture
async def pool(stubs: list[Stub]) -> AsyncIterator[PoolProvider]:
    p = PoolProvider(_cfg([s.url for s in stubs[:2]]))
    await p.start()
    yield p
    await p.close()


def _chat(text: str, system: str = "You are terse.") -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "system", "content": system}, {"role": "user", "content": text}]}


async def test_scrape_reads_vllm_names(pool: PoolProvider, stubs: list[Stub]) -> None:
    stubs[0].set(waiting=3, running=5, kv=0.42)
    await pool.scrape_once()
    a = pool.replicas[0]
    assert a.status == "up" and a.last is not None
    assert (a.last.waiting, a.last.running, a.last.kv_usage) == (3.0, 5.0, 0.42)
    assert a.load().load == 8.0


async def test_least_loaded_given_known_load(pool: PoolProvider, stubs: list[Stub]) -> None:
    stubs[0].set(waiting=6, running=4)
    stubs[1].set(waiting=0, running=1)
    await pool.scrape_once()
    picks = []
    for i in range(5):  # distinct conversations: no affinity pull
        reply = await pool.send("chat", _chat(f"question {i}"))
        assert reply.meta is not None and reply.meta["action"] == "replica"
        picks.append(reply.meta["replica"])
        assert reply.data["choices"][0]["message"]["content"] == f"from {reply.meta['replica']}"
    assert picks == ["b"] * 5
    # margin counts what it sent since the scrape: b is not "1" any more (sequential calls finished, though)
    stubs[0].set(waiting=0, running=1, kv=0.9)
    stubs[1].set(waiting=0, running=1, kv=0.1)
    await pool.scrape_once()
    reply = await pool.send("chat", _chat("tie"), {})
    assert reply.meta is not None and reply.meta["replica"] == "b"  # equal queues: lower KV use wins


@pytest.mark.parametrize("affinity", [False, True])
async def test_inflight_since_scrape_counts(stubs: list[Stub], affinity: bool) -> None:
    """Between scrapes the pool adds its own in-flight requests: a burst spreads out even though
    the last scrape said both replicas were idle (evenly without affinity; within the affinity
    slack of 2 requests with it)."""
    pool = PoolProvider(_cfg([s.url for s in stubs[:2]], affinity=affinity))
    await pool.start()
    try:
        await _burst(pool, affinity)
    finally:
        await pool.close()


async def _burst(pool: PoolProvider, affinity: bool) -> None:
    gate = asyncio.Event()
    orig = {r.name: r.http.send for r in pool.replicas}

    def slow(name: str) -> Any:
        async def send(*a: Any, **kw: Any) -> Any:
            await gate.wait()
            return await orig[name](*a, **kw)
        return send

    for r in pool.replicas:
        r.http.send = slow(r.name)  # type: ignore[method-assign]
    tasks = [asyncio.create_task(pool.send("chat", _chat(f"burst {i}"))) for i in range(6)]
    await asyncio.sleep(0.05)
    counts = sorted(r.inflight for r in pool.replicas)
    assert sum(counts) == 6 and (counts == [3, 3] if not affinity else counts[1] - counts[0] <= 2)
    gate.set()
    replies = await asyncio.gather(*tasks)
    assert all(x.meta for x in replies) and all(r.inflight == 0 for r in pool.replicas)


async def test_affinity_keeps_a_conversation_on_one_replica(pool: PoolProvider) -> None:
    await pool.scrape_once()
    history = [{"role": "system", "content": "You are a support agent."}, {"role": "user", "content": "Order 42?"}]
    seen = set()
    for turn in range(6):
        reply = await pool.send("chat", {"model": "m", "messages": history})
        assert reply.meta is not None
        seen.add(reply.meta["replica"])
        history += [{"role": "assistant", "content": "..."}, {"role": "user", "content": f"follow-up {turn}"}]
    assert len(seen) == 1
    # many conversations spread over both replicas
    firsts = set()
    for i in range(20):
        reply = await pool.send("chat", _chat(f"conversation {i}"))
        assert reply.meta is not None
        firsts.add(reply.meta["replica"])
    assert firsts == {"a", "b"}


async def test_run_id_is_the_affinity_key(pool: PoolProvider) -> None:
    await pool.scrape_once()
    got = set()
    for i in range(5):  # different prompts, one run
        reply = await pool.send("chat", _chat(f"step {i}"), {"x-margin-run-id": "case-7"})
        assert reply.meta is not None
        got.add(reply.meta["replica"])
    assert len(got) == 1


async def test_affinity_yields_when_its_replica_is_much_busier(pool: PoolProvider, stubs: list[Stub]) -> None:
    await pool.scrape_once()
    first = await pool.send("chat", _chat("hello", "sticky"))
    assert first.meta is not None
    home = first.meta["replica"]
    busy = stubs[0] if home == "a" else stubs[1]
    busy.set(waiting=0, running=8)  # beyond the slack of 2
    await pool.scrape_once()
    again = await pool.send("chat", _chat("hello", "sticky"))
    assert again.meta is not None and again.meta["replica"] != home
    assert f"affinity replica {home} busier: 8 vs 0" in again.meta["why"]
    busy.set(waiting=1, running=0)  # within the slack, but vLLM queues there: a request would wait
    await pool.scrape_once()
    again = await pool.send("chat", _chat("hello", "sticky"))
    assert again.meta is not None and again.meta["replica"] != home
    assert f"affinity replica {home} full" in again.meta["why"]
    busy.set(waiting=0, running=1)
    await pool.scrape_once()
    again = await pool.send("chat", _chat("hello", "sticky"))
    assert again.meta is not None and again.meta["replica"] == home and again.meta["why"].startswith("affinity")


async def test_streaming_carries_the_choice_on_the_first_chunk(pool: PoolProvider) -> None:
    await pool.scrape_once()
    chunks = [c async for c in pool.stream("chat", {**_chat("stream me"), "stream": True})]
    assert chunks[0].meta is not None and chunks[0].meta["action"] == "replica"
    assert all(c.meta is None for c in chunks[1:])
    assert chunks[-1].data is None  # [DONE]
    assert all(r.inflight == 0 for r in pool.replicas)
    served = pool.window.served[-1]
    assert served.ok and served.output_tokens == 3 and served.ttft_s is not None


async def test_failed_scrape_is_unknown_load_and_still_serves(stubs: list[Stub]) -> None:
    p = PoolProvider(_cfg([s.url for s in stubs[:2]]))
    await p.start()
    try:
        stubs[0].set(metrics_status=500, waiting=50)
        stubs[1].set(waiting=2, running=2)
        await p.scrape_once()
        assert [r.status for r in p.replicas] == ["unknown", "up"]
        assert "metrics HTTP 500" in p.replicas[0].down_reason
        reply = await p.send("chat", _chat("anyone"))
        assert reply.meta is not None and reply.meta["replica"] == "a"  # unknown: margin's own 0 in flight
    finally:
        await p.close()


async def test_refusing_replica_is_marked_down_and_skipped(stubs: list[Stub]) -> None:
    dead = _dead_url()
    p = PoolProvider(_cfg([dead, stubs[1].url]))
    await p.start()
    try:
        assert [r.status for r in p.replicas] == ["down", "up"]
        for i in range(4):
            reply = await p.send("chat", _chat(f"q{i}"))
            assert reply.meta is not None and reply.meta["replica"] == "b"
        # Marked up again (say a stale scrape) but still refusing: the same call moves on to b.
        p.replicas[0].status = "unknown"
        p.replicas[1].inflight = 5  # make the dead one look best
        reply = await p.send("chat", _chat("again"))
        assert reply.meta is not None and reply.meta["replica"] == "b"
        assert "a refused the connection" in reply.meta["why"]
        assert p.replicas[0].status == "down"
        p.replicas[1].inflight = 0
    finally:
        await p.close()


async def test_every_replica_refusing_raises_connection_error() -> None:
    p = PoolProvider(_cfg([_dead_url(), _dead_url()]))
    await p.start()
    try:
        with pytest.raises(UpstreamConnectionError):
            await p.send("chat", _chat("nobody"))
    finally:
        await p.close()


def test_pool_config_errors_are_precise() -> None:
    with pytest.raises(ValueError, match="kind vllm needs `replicas`"):
        ProviderConfig(name="p", kind="vllm")
    with pytest.raises(ValueError, match="replica names must be unique"):
        ProviderConfig(name="p", kind="tgi", replicas=["http://h:1/v1", "http://h:1/v1"])
    with pytest.raises(ValueError, match="`replicas` is for kinds"):
        ProviderConfig(name="p", kind="openai", base_url="http://x/v1", replicas=["http://h:1/v1"])
    with pytest.raises(ValueError, match="ttft_slo_s and/or tpot_slo_s"):
        ProviderConfig(name="p", kind="vllm", replicas=["http://h:1/v1"],
                       pool={"autoscale": {"model": "x", "gpu": "y"}})
    with pytest.raises(ValueError, match="unknown model 'no-such-model'"):
        ProviderConfig(name="p", kind="vllm", replicas=["http://h:1/v1"],
                       pool={"autoscale": {"model": "no-such-model", "gpu": "l4", "ttft_slo_s": 1}})
    with pytest.raises(ValueError, match=r"needs .* GB of weights"):
        ProviderConfig(name="p", kind="vllm", replicas=["http://h:1/v1"],
                       pool={"autoscale": {"model": "llama-2-70b", "gpu": "l4", "ttft_slo_s": 1}})


# ---- through the gateway ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gateway(stubs: list[Stub], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("pools")
    ledger = f"sqlite:///{tmp}/margin.db"
    cfg = gateway_config(tmp, "http://127.0.0.1:9/v1", ledger)
    cfg["providers"] = [{
        "name": "vpool", "kind": "vllm", "replicas": [{"base_url": s.url, "name": s.name} for s in stubs],
        "pool": {"scrape_interval_s": 0.2,
                 "autoscale": {"model": "llama-3.1-8b", "gpu": "l4", "ttft_slo_s": 2.0, "tpot_slo_s": 0.1,
                               "interval_s": 0.5, "window_s": 30, "min_replicas": 1, "max_replicas": 8}}}]
    cfg["models"] = [{"name": "house-8b", "provider": "vpool", "upstream_model": "m",
                      "price": {"self_hosted": {"gpu_hour_usd": "0.80"}},
                      "throughput": {"output_tokens_per_s": 400, "input_tokens_per_s": 4000}}]
    parse_config(cfg)  # the file the gateway reads is valid
    gw = start_gateway(tmp, cfg)
    yield gw
    assert gw.proc is not None
    stop(gw.proc)


def _admin(gw: Gateway) -> dict[str, str]:
    return {"Authorization": f"Bearer {gw.admin_key}"}


def test_gateway_routes_by_load_and_shows_pools(gateway: Gateway, stubs: list[Stub]) -> None:
    key = gateway.create_key(team="infra")["key"]
    stubs[0].set(waiting=9, running=9)
    stubs[1].set(waiting=7, running=9)
    stubs[2].set(waiting=0, running=1, kv=0.3)
    time.sleep(0.6)  # a few scrapes
    before = [s.served() for s in stubs]
    with httpx.Client(base_url=gateway.base_url, headers={"Authorization": f"Bearer {key}"}) as c:
        for i in range(4):
            r = c.post("/chat/completions", json={"model": "house-8b", "max_tokens": 8,
                                                  "messages": [{"role": "user", "content": f"q{i}"}]})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == "from c"
    assert [s.served() - b for s, b in zip(stubs, before, strict=True)] == [0, 0, 4]
    r = httpx.get(gateway.url + "/admin/pools", headers=_admin(gateway))
    assert r.status_code == 200
    (p,) = r.json()["data"]
    assert p["pool"] == "vpool" and p["kind"] == "vllm" and p["strategy"] == "least-loaded"
    reps = {x["name"]: x for x in p["replicas"]}
    assert reps["a"]["status"] == "up" and reps["a"]["waiting"] == 9 and reps["c"]["kv_usage"] == 0.3
    assert reps["c"]["sent"] >= 4
    adv = p["advice"]
    assert adv["model"]["gpu"] == "l4" and adv["recommended_replicas"] >= 1
    # the queue (16 waiting) needs replicas: the advice says why, with the cost of it
    assert adv["raw"]["limited_by"] in ("queue", "rate", "latency")
    assert adv["usd_per_hour"] == format(adv["recommended_replicas"] * 0.80, ".2f")
    metrics = httpx.get(gateway.url + "/metrics").text
    assert 'margin_recommended_replicas{pool="vpool"}' in metrics
    assert 'margin_recommended_cost_usd_per_hour{pool="vpool"}' in metrics
    assert 'margin_pool_replica_load{pool="vpool",replica="a"} 18.0' in metrics
    assert 'margin_pool_queue_depth{pool="vpool"} 16.0' in metrics


def test_admin_pools_needs_the_admin_key(gateway: Gateway) -> None:
    assert httpx.get(gateway.url + "/admin/pools").status_code == 401
    assert httpx.post(gateway.url + "/admin/pools", headers=_admin(gateway)).status_code == 405


def test_replica_recorded_in_the_ledger(gateway: Gateway) -> None:
    key = gateway.create_key(team="ledger-check")
    with httpx.Client(base_url=gateway.base_url, headers={"Authorization": f"Bearer {key['key']}"}) as c:
        assert c.post("/chat/completions", json={"model": "house-8b", "messages": [
            {"role": "user", "content": "hi"}]}).status_code == 200
        with c.stream("POST", "/chat/completions", json={"model": "house-8b", "stream": True, "messages": [
                {"role": "user", "content": "hi again"}]}) as r:
            r.read()
    rows = gateway.events(key["key_id"], expect=2)
    for row in rows:
        actions = row["actions"] if isinstance(row["actions"], list) else orjson.loads(row["actions"])
        rep = [a for a in actions if a.get("action") == "replica"]
        assert rep and rep[0]["pool"] == "vpool" and rep[0]["replica"] in ("a", "b", "c") and rep[0]["why"]


def test_metric_names_of_every_engine() -> None:
    """What each engine exposes maps to waiting / running / KV use / generated tokens."""
    from margin.providers.scrape import parse_metrics, parse_slots, pick

    tgi = ("# TYPE tgi_queue_size gauge\ntgi_queue_size 4\n"
           "# TYPE tgi_batch_current_size gauge\ntgi_batch_current_size 7\n")
    triton = ('# TYPE nv_inference_pending_request_count gauge\n'
              'nv_inference_pending_request_count{model="a",version="1"} 2\n'
              'nv_inference_pending_request_count{model="b",version="1"} 3\n')
    llama = ("# TYPE llamacpp:requests_processing gauge\nllamacpp:requests_processing 2\n"
             "# TYPE llamacpp:requests_deferred gauge\nllamacpp:requests_deferred 1\n"
             "# TYPE llamacpp:tokens_predicted_total counter\nllamacpp:tokens_predicted_total 812\n")
    v1 = '# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc{engine="0"} 0.25\n'
    assert (pick(parse_metrics(tgi), "waiting"), pick(parse_metrics(tgi), "running")) == (4.0, 7.0)
    assert pick(parse_metrics(triton), "waiting") == 5.0  # summed over models on one server
    m = parse_metrics(llama)
    assert (pick(m, "waiting"), pick(m, "running"), pick(m, "generation_tokens")) == (1.0, 2.0, 812.0)
    assert pick(parse_metrics(v1), "kv_usage") == 0.25
    assert parse_slots([{"id": 0, "is_processing": True, "n_prompt_tokens_cache": 40},
                        {"id": 1, "is_processing": False}]) == (2, 1, 40)
    assert parse_slots({"error": "no"}) is None
