"""The dashboard's Pools page (issue 11: autoscaling advice in the dashboard) against a real gateway
whose self-hosted pool has three stub vLLM replicas (tests/test_selfhosted_vllm.py's stub: small real
HTTP servers in their own processes serving vLLM's Prometheus names with the load the test sets)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import Gateway, gateway_config, start_gateway, stop
from tests.test_selfhosted_vllm import Stub as Replica  # a vLLM replica: its Prometheus names and chat answers
from tests.test_ui_access import ADMIN, sign_in_http


@pytest.fixture(scope="module")
def pool_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, list[Replica]]]:
    reps = [Replica(n) for n in ("r1", "r2", "r3")]
    tmp = tmp_path_factory.mktemp("uipools")
    cfg = gateway_config(tmp, "http://127.0.0.1:9/v1", f"sqlite:///{tmp}/margin.db")
    cfg["providers"] = [{
        "name": "house", "kind": "vllm",
        "replicas": [{"base_url": f"http://127.0.0.1:{r.port}/v1", "name": r.name} for r in reps],
        "pool": {"scrape_interval_s": 0.2,
                 "autoscale": {"model": "llama-3.1-8b", "gpu": "l4", "ttft_slo_s": 2.0, "tpot_slo_s": 0.1,
                               "interval_s": 0.5, "window_s": 30, "min_replicas": 1, "max_replicas": 8,
                               "usd_per_replica_hour": "0.80"}}}]
    cfg["models"] = [{"name": "house-8b", "provider": "house", "upstream_model": "m",
                      "price": {"self_hosted": {"gpu_hour_usd": "0.80"}},
                      "throughput": {"output_tokens_per_s": 400, "input_tokens_per_s": 4000}}]
    gw = start_gateway(tmp, cfg)
    try:
        yield gw, reps
    finally:
        assert gw.proc is not None
        stop(gw.proc)
        for r in reps:
            stop(r.proc)


def test_pools_page_shows_replicas_load_and_advice(pool_gateway: tuple[Gateway, list[Replica]]) -> None:
    gw, reps = pool_gateway
    reps[0].set(waiting=9, running=9, kv=0.5)
    reps[1].set(waiting=7, running=9)
    reps[2].set(waiting=0, running=1, kv=0.25)
    key = gw.create_key(team="infra")["key"]
    for i in range(3):
        answer = httpx.post(gw.base_url + "/chat/completions", headers={"Authorization": f"Bearer {key}"},
                            json={"model": "house-8b", "max_tokens": 8,
                                  "messages": [{"role": "user", "content": f"{i}"}]})
        assert answer.status_code == 200, answer.text
    api = httpx.get(gw.url + "/admin/pools", headers={"Authorization": f"Bearer {ADMIN}"}).json()["data"][0]
    c, _ = sign_in_http(gw, ADMIN)
    deadline = time.monotonic() + 10  # scrapes every 0.2 s, advice every 0.5 s
    while True:
        page = c.get("/ui/pools")
        assert page.status_code == 200, page.text
        text = page.text
        loads = dict(re.findall(r'data-replica="(r\d)".*?<td class="num">([\d.]+)</td>', text, re.S))
        if ("data-recommended" in text and loads.get("r1") == "18") or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert 'href="/ui/pools"' in text  # admins see it in the navigation when a pool exists
    for r in reps:
        assert f'data-replica="{r.name}"' in text and f"127.0.0.1:{r.port}/v1" in text
    assert loads["r1"] == "18" and loads["r3"] == "1"  # load = waiting + running, as scraped
    assert "50.0%" in text  # r1's KV cache
    n = int(re.search(r"data-recommended>(\d+)<", text).group(1))  # type: ignore[union-attr]
    assert n >= 1 and f"${n * 0.80:.2f}/h" in text  # the recommended replicas and what they cost
    assert api["advice"]["recommended_replicas"] >= 1 and api["pool"] == "house"
    assert "llama-3.1-8b on l4" in text and 'margin_recommended_replicas{pool="house"}' in text.replace("&#34;", '"')
    viewer = gw.create_key(team="infra", name="v", tags={"role": "viewer"})
    v, _ = sign_in_http(gw, viewer["key"])
    assert 'href="/ui/pools"' not in v.get("/ui/overview").text
    assert v.get("/ui/pools").status_code == 403
