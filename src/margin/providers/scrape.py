"""Reading a self-hosted replica's own load: its Prometheus metrics, and llama.cpp's /slots.

Each engine names the same few quantities differently; the first name present wins (NAMES below):
waiting requests (vLLM `vllm:num_requests_waiting`, llama.cpp `llamacpp:requests_deferred`, TGI
`tgi_queue_size`, Triton `nv_inference_pending_request_count`), running requests
(`vllm:num_requests_running`, `llamacpp:requests_processing` or the busy slots of /slots,
`tgi_batch_current_size`), KV-cache use (`vllm:gpu_cache_usage_perc`, `vllm:kv_cache_usage_perc` in
vLLM V1) and token counters (prompt and generated tokens, for the advice's live throughput).
Triton running its vLLM backend exposes the vllm: names too. Values of one name are summed over
label sets (several models on one server add up to the server's load)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from prometheus_client.parser import text_string_to_metric_families

from margin.config import ReplicaConfig

NAMES: dict[str, tuple[str, ...]] = {
    "waiting": ("vllm:num_requests_waiting", "llamacpp:requests_deferred", "tgi_queue_size",
                "nv_inference_pending_request_count"),
    "running": ("vllm:num_requests_running", "llamacpp:requests_processing", "tgi_batch_current_size"),
    "kv_usage": ("vllm:gpu_cache_usage_perc", "vllm:kv_cache_usage_perc"),
    "prompt_tokens": ("vllm:prompt_tokens_total", "llamacpp:prompt_tokens_total", "tgi_request_input_length_sum"),
    "generation_tokens": ("vllm:generation_tokens_total", "llamacpp:tokens_predicted_total",
                          "tgi_request_generated_tokens_sum"),
    "gpu_utilisation": ("nv_gpu_utilization",),
}


@dataclass(frozen=True, slots=True)
class Scrape:
    """One scrape of one replica. `refused`: nothing listens there (the replica is down);
    otherwise `ok` False means the load is unknown (timeout, error status, unreadable body)."""

    at: float  # monotonic time the scrape completed
    ok: bool
    refused: bool = False
    error: str = ""
    waiting: float | None = None
    running: float | None = None
    kv_usage: float | None = None
    slots: int | None = None  # llama.cpp: parallel slots (the most it runs at once)
    busy_slots: int | None = None
    cached_prompt_tokens: int | None = None  # llama.cpp: prompt tokens the slots reused from their cache
    prompt_tokens: float | None = None  # counters since the engine started
    generation_tokens: float | None = None
    gpu_utilisation: float | None = None


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition -> sample name -> value summed over label sets."""
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[s.name] = out.get(s.name, 0.0) + float(s.value)
    return out


def pick(values: Mapping[str, float], quantity: str) -> float | None:
    for name in NAMES[quantity]:
        if name in values:
            return values[name]
    return None


def parse_slots(data: Any) -> tuple[int, int, int] | None:
    """llama.cpp /slots -> (slots, busy slots, prompt tokens served from slot caches)."""
    if not isinstance(data, list) or not all(isinstance(s, dict) for s in data):
        return None
    busy = sum(1 for s in data if s.get("is_processing"))
    cached = sum(int(s.get("n_prompt_tokens_cache") or 0) for s in data if s.get("is_processing"))
    return len(data), busy, cached


def root_url(base_url: str) -> str:
    """The server root of an OpenAI base URL (`http://h:8000/v1` -> `http://h:8000`)."""
    return base_url.rstrip("/").removesuffix("/v1")


def metrics_url(replica: ReplicaConfig) -> str:
    return replica.metrics_url or root_url(replica.base_url) + "/metrics"


def _refused(e: BaseException) -> bool:
    return isinstance(e, aiohttp.ClientConnectorError) and not isinstance(e, aiohttp.ClientConnectorCertificateError)


async def _get(session: aiohttp.ClientSession, url: str, timeout: float) -> tuple[int, bytes]:
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
        return resp.status, await resp.read()


async def scrape(session: aiohttp.ClientSession, kind: str, replica: ReplicaConfig, timeout: float) -> Scrape:
    """Scrape one replica's metrics (and, for llama.cpp, /slots, which needs no --metrics flag)."""
    fields: dict[str, Any] = {}
    errors: list[str] = []
    try:
        status, body = await _get(session, metrics_url(replica), timeout)
        if status == 200:
            values = parse_metrics(body.decode(errors="replace"))
            for q in NAMES:
                v = pick(values, q)
                if v is not None:
                    fields[q] = v
            if "gpu_utilisation" in fields:  # Triton reports 0..1 per GPU: the mean, not the sum
                n = sum(1 for k in values if k == "nv_gpu_utilization")
                fields["gpu_utilisation"] /= max(1, n)
        else:
            errors.append(f"metrics HTTP {status}")
        if kind == "llamacpp-server":
            s_status, s_body = await _get(session, root_url(replica.base_url) + "/slots", timeout)
            slots = parse_slots(orjson.loads(s_body)) if s_status == 200 else None
            if slots is not None:
                fields["slots"], fields["busy_slots"], fields["cached_prompt_tokens"] = slots
                fields.setdefault("running", float(slots[1]))
            else:
                errors.append(f"slots HTTP {s_status}")
    except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError, ValueError) as e:
        if _refused(e):
            return Scrape(time.monotonic(), ok=False, refused=True, error=f"connection refused: {e}")
        return Scrape(time.monotonic(), ok=False, error=f"{type(e).__name__}: {e}"[:200])
    known = "waiting" in fields or "running" in fields
    return Scrape(time.monotonic(), ok=known, error="; ".join(errors) if not known else "", **fields)
