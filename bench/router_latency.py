"""Decision latency of what margin ships for routing, side by side in one run on this CPU:

- the learned router (TF-IDF + logistic regression per model, per-query cost, ``choose``), one
  decision per prompt, on RouteLLM MMLU and GSM8K prompts;
- the cascade verifier (checks + TF-IDF LR on question + cheap answer, prompt-only P(strong
  right), ``policy.verify.verdict``), one verification per GSM8K answer (the cheap call itself is
  not included);
- optionally (``--embeddings``) an all-MiniLM-L6-v2 encode of one prompt, the step an embedding
  router would add.

Rounds interleave the kinds so machine noise hits them alike. Writes bench/results/router_latency.json
and the ``router`` section of BENCHMARKS.md.

    .venv/bin/python bench/router_latency.py [--n 1000] [--embeddings] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import sklearn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from margin.policy.learned import choose  # noqa: E402
from margin.policy.verify import verdict  # noqa: E402
from margin.router import cascade_eval as CE  # noqa: E402
from margin.router import data  # noqa: E402
from margin.router import train as T  # noqa: E402

SHARED = Path(os.environ.get("MARGIN_SHARED_DATA", ROOT.parent / "shared" / "data")) / "routing" / "routellm"
MARK_START, MARK_END = "<!-- router:start -->", "<!-- router:end -->"


def timed(fn: Callable[[int], object], n: int, rounds: int) -> list[float]:
    out = []
    for r in range(rounds):
        for i in range(r * n // rounds, (r + 1) * n // rounds):
            t0 = time.perf_counter()
            fn(i)
            out.append(time.perf_counter() - t0)
    return out


def router_decision(t: data.RoutingTable) -> Callable[[int], object]:
    r = T.make_router("tfidf-lr", t.models).fit(t.prompts, t.scores)
    coef = T.fit_cost_model(t.prompts, t.costs)
    lam = float(T.lambda_grid(t.costs.mean(axis=0))[60])

    def decide(i: int) -> str:
        p = t.prompts[i % len(t)]
        return choose(r.predict(p), T.prompt_costs(coef, t.models, p), lam=lam)

    return decide


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--embeddings", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    mmlu = data.load("routellm", [SHARED / "mmlu"])
    gsm = data.load("routellm", [SHARED / "gsm8k_responses.csv"])
    kinds: dict[str, Callable[[int], object]] = {}
    for name, t in (("router, RouteLLM MMLU", mmlu), ("router, RouteLLM GSM8K", gsm)):
        kinds[name] = router_decision(t)
    cj, sj = CE.pair(gsm, data.STRONG)
    v = CE.fit(gsm, cj, sj)
    answers = gsm.responses[gsm.models[cj]]
    kinds["cascade verifier, GSM8K answer"] = lambda i: verdict(
        *v.predict(gsm.prompts[i % len(gsm)], answers[i % len(gsm)]), 0.2)
    if a.embeddings:
        from margin.cache_eval.embed import MiniLM

        enc = MiniLM(batch_size=1)
        kinds["MiniLM encode of one prompt (not shipped)"] = lambda i: enc.encode([mmlu.prompts[i % len(mmlu)]])
    for fn in kinds.values():  # warm-up
        for i in range(20):
            fn(i)
    load_before = os.getloadavg()[0]
    rounds = 10
    samples: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(rounds):  # interleave: each kind runs one slice per round
        for k, fn in kinds.items():
            samples[k] += timed(lambda i, fn=fn, r=r: fn(r * a.n // rounds + i), a.n // rounds, 1)
    res: dict[str, Any] = {
        "date": datetime.now(UTC).date().isoformat(),
        "machine": f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}",
        "python": platform.python_version(), "sklearn": sklearn.__version__, "n": a.n,
        "command": "python bench/router_latency.py" + (" --embeddings" if a.embeddings else ""),
        # other work on the machine shows up in p99: say how busy it was
        "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "kinds": {k: {"p50_ms": float(np.percentile(s, 50) * 1e3), "p99_ms": float(np.percentile(s, 99) * 1e3),
                      "mean_ms": float(np.mean(s) * 1e3), "n": len(s)} for k, s in samples.items()},
    }
    base = res["kinds"]["router, RouteLLM MMLU"]["p50_ms"]
    for k in res["kinds"].values():
        k["p50_vs_router_mmlu"] = k["p50_ms"] / base
    print(json.dumps(res, indent=2))
    if a.no_write:
        return
    (ROOT / "bench/results").mkdir(exist_ok=True)
    (ROOT / "bench/results/router_latency.json").write_text(json.dumps(res, indent=2) + "\n")
    write_section(res)


def write_section(res: dict[str, Any]) -> None:
    rows = "\n".join(f"| {k} | {v['p50_ms']:.3f} ms | {v['p99_ms']:.3f} ms | {v['p50_vs_router_mmlu']:.1f}x |"
                     for k, v in res["kinds"].items())
    section = f"""{MARK_START}
## Learned router and cascade verifier decision latency

One decision on CPU, timed single-call ({res['n']} per kind, kinds interleaved in one run):
the learned router (TF-IDF featurisation, per-model logistic regression, per-query cost estimate,
`choose`) and the cascade verifier (answer checks, TF-IDF logistic regression on question + cheap
answer, prompt-only P(strong right), `policy.verify.verdict`; the cheap model's call is not
included). Target: under 2 ms for the baseline router. Quality and cost results:
[docs/routing.md](docs/routing.md).

- Command: `.venv/bin/python {res['command'].removeprefix('python ')}`
- Date: {res['date']}; machine: {res['machine']}, Python {res['python']}, scikit-learn {res['sklearn']};
  1-minute load average before / after: {res['load_average_1m'][0]} / {res['load_average_1m'][1]}
  (other jobs sharing the 2 cores inflate p99)

| decision | p50 | p99 | p50 vs router on MMLU |
|---|---:|---:|---:|
{rows}
{MARK_END}"""
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text()
    if MARK_START in text and MARK_END in text:
        head, rest = text.split(MARK_START, 1)
        text = head + section + rest.split(MARK_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


if __name__ == "__main__":
    main()
