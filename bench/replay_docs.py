"""The numbers and charts of docs/replay.md: Azure conv and Mooncake conversation under the three
policies in docs/replay/, and the fewest H100 replicas for Llama-3.1-8B meeting p99 TTFT 2 s / TPOT
200 ms at 1x, 10x and 100x the trace rate.

    .venv/bin/python bench/replay_docs.py          # prints markdown tables, writes docs/img/replay_*.png
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from margin.planner.perf import deployment  # noqa: E402
from margin.replay.engine import replay  # noqa: E402
from margin.replay.policy import load_policy  # noqa: E402
from margin.replay.report import plot_replay  # noqa: E402
from margin.replay.sim import SimConfig, Simulator, find_replicas  # noqa: E402
from margin.replay.simreport import plot_sim, sim_row  # noqa: E402
from margin.replay.summary import summarise  # noqa: E402
from margin.replay.traces import read_trace  # noqa: E402

DATA = Path(os.environ.get("MARGIN_SHARED_DATA", ROOT.parent / "shared" / "data")) / "traces"
IMG = ROOT / "docs" / "img"
POLICIES = ("strong", "rules", "rules_cache")


def money(x: str) -> str:
    return f"{float(x):,.2f}"


def policies() -> list[dict[str, Any]]:
    out = []
    for trace in ("azure2023_conv.csv", "mooncake_conversation.jsonl"):
        tr = read_trace(DATA / trace)
        results = [summarise(replay(tr, load_policy(ROOT / "docs" / "replay" / f"{p}.yaml"))) for p in POLICIES]
        for r in results:
            r["policy"] = Path(r["policy"]).stem
        plot_replay(results[::-1], IMG)  # first = routing + caching: its lever waterfall
        print(f"\n### {tr.name}: {len(tr):,} requests, {tr.duration_s / 3600:.2f} h\n")
        print("| policy | cost USD | saved vs all-gpt-4o | routing | exact cache | prefix cache | gpt-4o share | "
              "cached input |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in results:
            strong = next((m["requests"] for m in r["by_model"] if m["model"] == "gpt-4o"), 0)
            lv = r["levers"]
            print(f"| {r['policy']} | {money(r['cost_usd'])} | {r['saved_pct']}% | {money(lv['routing'])} | "
                  f"{money(lv['exact_cache'])} ({r['cache_hits']} hits) | {money(lv['prefix_cache'])} | "
                  f"{strong / r['requests']:.1%} | {r['tokens']['cached_input'] / max(1, r['tokens']['input']):.1%} |")
        out.append({"trace": tr.name, "results": results})
    return out


def replicas() -> list[dict[str, Any]]:
    dep = deployment("llama-3.1-8b", "h100-sxm")
    cfg = SimConfig()
    out = []
    tr = read_trace(DATA / "azure2023_conv.csv")
    head = {"trace": tr.summary(), "model": "llama-3.1-8b", "gpu": "h100-sxm", "tp": 1, "precision": "bf16",
            "scheduler": {"max_batched_tokens": cfg.max_batched_tokens, "max_seqs": cfg.max_seqs},
            "slo": {"ttft_s": 2.0, "tpot_s": 0.2, "percentile": "p99"}}
    rows, results = [], []
    print(f"\n### fewest replicas, {tr.name}\n")
    print("| rate | req/s | replicas | analytic bound | tried | TTFT p50/p99 s | TPOT p50/p99 ms | busy | USD/h | "
          "USD per M output | J/output token | wall s |")
    print("|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for k in (1, 10, 100):
        t0 = time.perf_counter()
        s = find_replicas(tr.scaled(k) if k != 1 else tr, dep, cfg, 2.0, 0.2)
        assert s.replicas is not None
        r = s.tried[s.replicas]
        rows.append(sim_row(k, r, s.replicas, sorted(s.tried), s.lower_bound))
        results.append(r)
        print(f"| {k}x | {tr.rate_per_s * k:,.1f} | {s.replicas} | {s.lower_bound} | {sorted(s.tried)} | "
              f"{r.ttft_s['p50']:.3f} / {r.ttft_s['p99']:.3f} | {r.tpot_s['p50'] * 1e3:.1f} / "
              f"{r.tpot_s['p99'] * 1e3:.1f} | {r.gpu_utilisation:.0%} | "
              f"{float(dep.gpu.usd_per_hour) * s.replicas:.2f} | {float(r.usd_per_million_output or 0):.3f} | "
              f"{r.joules_per_output_token:.3f} | {time.perf_counter() - t0:.1f} |")
        ll = r.littles_law
        print(f"<!-- {k}x Little: lambda W {ll['lambda_w']:.2f} vs seen {ll['mean_in_system_seen_by_arrivals']:.2f};"
              f" preemptions {r.preemptions}; steps {r.steps} -->")
    plot_sim(rows, results, head, IMG)
    out.append({"trace": tr.name, "rows": rows})
    moon = read_trace(DATA / "mooncake_conversation.jsonl")
    print(f"\n### {moon.name} at 1x\n")
    print("| replicas | TTFT p50/p90/p99 s | TPOT p99 ms | prefix hit | preemptions |")
    print("|---:|---:|---:|---:|---:|")
    for n in (4, 8, 16, 32):
        r = Simulator(dep, SimConfig(replicas=n)).run(moon)
        print(f"| {n} | {r.ttft_s['p50']:.2f} / {r.ttft_s['p90']:.2f} / {r.ttft_s['p99']:.2f} | "
              f"{r.tpot_s['p99'] * 1e3:.0f} | {r.prefix_hit_share:.1%} | {r.preemptions} |")
        out.append({"trace": moon.name, "replicas": n, "result": r.to_dict()})
    return out


if __name__ == "__main__":
    res = {"policies": policies(), "replicas": replicas()}
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "results" / "replay_docs.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
