"""Latency through the gateway of a cache miss, an exact hit and a semantic hit, in one run.

One gateway (exact cache on; semantic cache on the route `faq`, and on `faq-verified` with a
verifier when --verifier is given) in front of the mock upstream (no added delay, so the numbers
are the gateway's own cost, embedding included). Requests go one at a time, interleaved by kind:

- plain miss: a new question on a route without the semantic cache (the baseline);
- semantic miss: a new question on `faq` (exact miss, then embed + search, then the upstream);
- exact hit: the same request again;
- semantic hit: the question re-cased and re-punctuated (an exact miss, a semantic hit).

Questions are QQP's (tests/data/cache/qqp_sample.json). Writes the `cache` section of BENCHMARKS.md.

    .venv/bin/python bench/cache_latency.py --n 150 --out BENCHMARKS.md [--verifier DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from common import ROOT, console
from procs import machine_info
from render import update_markdown
from stack import Stack, start_margin, start_mock

QUESTIONS = ROOT / "tests/data/cache/qqp_sample.json"


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def body(model: str, text: str) -> dict[str, Any]:
    return {"model": model, "temperature": 0, "max_tokens": 16,
            "messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": text}]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=150, help="requests per kind")
    ap.add_argument("--verifier", type=Path, default=None, help="verifier artefact for the faq-verified route")
    ap.add_argument("--out", type=Path, default=None, help="BENCHMARKS.md to update")
    args = ap.parse_args()
    t_start = time.monotonic()
    texts = list(dict.fromkeys(p["text_a"] for p in json.loads(QUESTIONS.read_text())))
    routes: list[dict[str, Any]] = [{"name": "faq", "candidates": ["gpt-4o-mini"],
                                     "semantic_cache": {"threshold": 0.95, "top_k": 5}},
                                    {"name": "plain", "candidates": ["gpt-4o-mini"]}]
    semantic_routes = ["faq"]
    if args.verifier:
        routes.append({"name": "faq-verified", "candidates": ["gpt-4o-mini"],
                       "semantic_cache": {"verifier": str(args.verifier.resolve()), "threshold": 0.8}})
        semantic_routes.append("faq-verified")
    need = args.n * (1 + len(semantic_routes))
    if need > len(texts):
        raise SystemExit(f"--n {args.n} needs {need} distinct questions; the sample has {len(texts)}")
    with tempfile.TemporaryDirectory() as tmp:
        stack = Stack(Path(tmp))
        (stack.tmp / "logs").mkdir()
        try:
            start_mock(stack, [], None)
            start_margin(stack, "margin", {"cache": {"enabled": True, "ttl_s": 3600}, "groups": routes,
                                           "semantic_cache": {"ttl_s": 3600, "onnx_path": str(
                                               ROOT / ".margin/models/all-MiniLM-L6-v2.onnx")}})
            t = stack.targets["margin"]
            lat: dict[str, list[float]] = {}
            served: dict[str, int] = {}
            with httpx.Client(timeout=60) as c:
                def send(kind: str, payload: dict[str, Any], expect: str | None) -> None:
                    t0 = time.perf_counter()
                    r = c.post(t.url, json=payload, headers=t.headers)
                    ms = (time.perf_counter() - t0) * 1000
                    r.raise_for_status()
                    lat.setdefault(kind, []).append(ms)
                    served[kind] = served.get(kind, 0) + (r.headers.get("x-margin-cache") == expect)

                for q in texts[:5]:  # warm up: connections, the embedder's first runs
                    send("warm", body("faq", "warm up " + q), None)
                it = iter(texts[5:])
                for _ in range(args.n):
                    send("plain miss", body("plain", next(it)), None)
                    for route in semantic_routes:
                        q = next(it)
                        send(f"{route}: semantic miss", body(route, q), None)
                        send(f"{route}: exact hit", body(route, q), "hit")
                        send(f"{route}: semantic hit", body(route, q.lower().rstrip("?") + " ?"), "semantic")
        finally:
            stack.stop()
    lat.pop("warm", None)
    base = statistics.median(lat["plain miss"])
    rows = [{"kind": k, "n": len(v), "served_as_expected": served.get(k, 0) if "hit" in k else "-",
             "p50_ms": round(statistics.median(v), 2), "p95_ms": round(pct(v, 0.95), 2),
             "p99_ms": round(pct(v, 0.99), 2), "p50_vs_plain_miss": round(statistics.median(v) - base, 2)}
            for k, v in lat.items()]
    for r in rows:
        console.print(r)
    if args.out:
        update_markdown(args.out, section(rows, args, time.monotonic() - t_start), "<!-- cache:start -->",
                        "<!-- cache:end -->")
        console.print(f"updated {args.out}")


def section(rows: list[dict[str, Any]], args: argparse.Namespace, took: float) -> str:
    m = machine_info()
    cmd = f".venv/bin/python bench/cache_latency.py --n {args.n} --out BENCHMARKS.md" + (
        f" --verifier {args.verifier}" if args.verifier else "")
    lines = [
        "## Cache latency: miss, exact hit, semantic hit",
        "",
        "One gateway (exact cache on; semantic cache on route `faq`: cosine threshold 0.95, top-5"
        + (", and on `faq-verified` with the QQP verifier at score threshold 0.8" if args.verifier else "")
        + ") in front of the mock upstream with no added delay, so a miss shows the gateway's own cost and a"
        " real provider's latency comes on top. Requests one at a time, kinds interleaved. A semantic hit"
        " is the stored question re-cased and re-punctuated (an exact miss). Embedding: all-MiniLM-L6-v2 on"
        " ONNX Runtime, 1 thread; search: hnswlib HNSW.",
        "",
        f"- Command: `{cmd}`",
        f"- Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC (run {took:.0f} s); machine: {m['nproc']} CPUs, {m['cpu']}, "
        f"Python {m['python']}, margin commit {m['margin_commit']}",
        "",
        "| kind | requests | served from cache | p50 ms | p95 ms | p99 ms | p50 vs plain miss |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['kind']} | {r['n']} | {r['served_as_expected']} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | "
                     f"{r['p99_ms']:.2f} | {r['p50_vs_plain_miss']:+.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
