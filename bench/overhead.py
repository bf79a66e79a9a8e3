"""The latency margin adds to a chat call, beside a direct call and beside LiteLLM, in one run.

    .venv/bin/python bench/overhead.py [--rps 25,200,500,1000] [--duration 20] [--out BENCHMARKS.md]
    .venv/bin/python bench/overhead.py --quick          # smoke: 200 RPS, 5 s, no LiteLLM

Starts on free 127.0.0.1 ports: the mock upstream, the margin gateway (metering ON: SQLite
ledger) with a fresh virtual key, and - if `.venv-litellm` exists (bench/setup_litellm.sh) - a
LiteLLM proxy routed to the same mock. Then, for every RPS level, drives each target with the
open-loop generator in bench/loadgen.py (own process; latency from the *scheduled* send time),
in interleaved rounds (direct, margin, litellm, direct, margin, litellm, ...) to cancel drift.
`--duration` is the measured time per target and RPS level, split evenly across the rounds.

Reports achieved RPS, p50/p90/p99/max, errors, latency added over the direct call at the same
RPS, LiteLLM's added latency relative to margin's, server CPU per request, and the max sustained
RPS (achieved >= 95% of target, errors < 0.1%, p99 < 100 ms), stepping up past the highest level
while the time budget allows. Writes bench/results/overhead.json and, with --out, the section
between <!-- overhead:start --> and <!-- overhead:end --> of that Markdown file.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import platform
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
VENV_BIN = ROOT / ".venv" / "bin"
PYTHON = VENV_BIN / "python"
MARGIN = VENV_BIN / "margin"
LITELLM = ROOT / ".venv-litellm" / "bin" / "litellm"
LITELLM_VERSION = "1.106.2"
LOADGEN = BENCH / "loadgen.py"
RESULTS_JSON = BENCH / "results" / "overhead.json"

MODEL = "gpt-4o-mini"
BODY = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello in five words"}],"max_tokens":16}'
CHAT_PATH = "/v1/chat/completions"
ADMIN_KEY = "bench-admin"
MARK_START = "<!-- overhead:start -->"
MARK_END = "<!-- overhead:end -->"

# "Sustained" criteria.
MIN_ACHIEVED_FRACTION = 0.95
MAX_ERROR_RATE = 0.001
MAX_P99_MS = 100.0

FOREIGN_CPU_WARN_PCT = 10.0
LOADGEN_CPU_WARN_PCT = 80.0

# Past this a target is dropped from higher levels.
OVERLOAD_ACHIEVED_FRACTION = 0.5
OVERLOAD_ERROR_RATE = 0.2

TARGET_ORDER = ("direct", "margin", "litellm")

console = Console(width=None if sys.stdout.isatty() else 140)


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def group_cpu_seconds(pgid: int) -> float:
    """User+system CPU of every live process in the process group (a server and its workers)."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        rest = stat[stat.rfind(b")") + 2 :].split()
        if len(rest) > 12 and int(rest[2]) == pgid:
            total += int(rest[11]) + int(rest[12])
    return total / _CLK_TCK


def machine_busy_seconds() -> float:
    """CPU-seconds all CPUs spent busy since boot (from /proc/stat), for spotting foreign load."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    guest = sum(vals[8:10]) if len(vals) > 9 else 0  # already counted in user/nice
    return (sum(vals) - guest - idle) / _CLK_TCK


@dataclass
class Service:
    """A subprocess in its own session (process group), logging to a file."""

    name: str
    cmd: list[str]
    log: Path
    env: dict[str, str] | None = None
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as out:
            self.popen = subprocess.Popen(
                self.cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=self.env,
                start_new_session=True,
            )

    @property
    def pgid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def cpu(self) -> float:
        return group_cpu_seconds(self.pgid) if self.alive() else 0.0

    def tail(self, lines: int = 25) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace_s: float = 8.0) -> None:
        p = self.popen
        if p is None or p.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=5)
        # Workers that outlived their parent (uvicorn --workers) share the group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)


class StartupError(RuntimeError):
    pass


def http(
    url: str, body: bytes | None = None, headers: dict[str, str] | None = None, timeout: float = 5.0
) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, headers=headers or {}, method="POST" if body else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return int(r.status), r.read()
    except urllib.error.HTTPError as e:
        return int(e.code), e.read()


def wait_ready(
    svc: Service,
    url: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout_s: float = 30.0,
) -> None:
    """Poll until `url` answers 200 (bounded by timeout_s); fail early if the process died."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if not svc.alive():
            raise StartupError(f"{svc.name} exited during start-up:\n{svc.tail()}")
        try:
            status, data = http(url, body, headers, timeout=5.0)
            if status == 200:
                return
            last = f"HTTP {status}: {data[:300]!r}"
        except (OSError, urllib.error.URLError) as e:
            last = str(e)
        time.sleep(0.25)
    raise StartupError(f"{svc.name} not ready after {timeout_s:.0f}s at {url} ({last}):\n{svc.tail()}")


def command_works(cmd: Sequence[str], timeout_s: float = 30.0) -> bool:
    try:
        r = subprocess.run(list(cmd), cwd=ROOT, capture_output=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def settle(services: Sequence[Service], max_s: float = 20.0, idle_cpu: float = 0.10) -> float | None:
    """Wait (bounded) until the servers are idle, so one run's tail (e.g. ledger flushes) does
    not spill into the next target's measurement. Returns the seconds waited, None on timeout."""
    t0 = time.monotonic()
    time.sleep(0.5)
    while time.monotonic() - t0 < max_s:
        before = sum(s.cpu() for s in services)
        time.sleep(0.3)
        if (sum(s.cpu() for s in services) - before) / 0.3 < idle_cpu:
            return time.monotonic() - t0
    return None


# --------------------------------------------------------------------------- targets


@dataclass
class Target:
    name: str
    url: str
    headers: dict[str, str]
    server: Service  # whose CPU is charged to this target


@dataclass
class Stack:
    tmp: Path
    services: list[Service] = field(default_factory=list)
    targets: dict[str, Target] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    mock: Service | None = None
    mock_cmd: str = ""

    def retire(self, target: str) -> None:
        """Stop the server behind a target that will not be measured again."""
        svc = self.targets[target].server
        if svc is not self.mock and svc in self.services:
            svc.stop()
            self.services.remove(svc)

    def stop(self) -> None:
        for svc in reversed(self.services):
            try:
                svc.stop()
            except Exception as e:  # keep stopping the others
                console.print(f"[red]could not stop {svc.name}: {e}[/red]")


def start_mock(stack: Stack, mock_args: list[str], mock_cmd: str | None) -> None:
    port = free_port()
    if mock_cmd:
        cmd = shlex.split(mock_cmd.replace("{port}", str(port)))
        stack.notes.append(f"custom upstream: {mock_cmd}")
    elif command_works([str(MARGIN), "mock-upstream", "--help"]):
        cmd = [str(MARGIN), "mock-upstream", "--host", "127.0.0.1", "--port", str(port), *mock_args]
    else:
        if mock_args:
            raise StartupError("`margin mock-upstream` is not available, so --mock-arg cannot be applied")
        code = (
            f"from margin.providers.mock_upstream import serve, MockOptions; serve('127.0.0.1', {port}, MockOptions())"
        )
        cmd = [str(PYTHON), "-c", code]
        stack.notes.append("mock started via margin.providers.mock_upstream.serve (CLI not available)")
    svc = Service("mock", cmd, stack.tmp / "logs" / "mock.log")
    stack.services.append(svc)
    svc.start()
    stack.mock = svc
    stack.mock_cmd = shlex.join(cmd)
    url = f"http://127.0.0.1:{port}{CHAT_PATH}"
    headers = {"content-type": "application/json", "authorization": "Bearer sk-mock"}
    wait_ready(svc, url, BODY, headers, timeout_s=30)
    stack.targets["direct"] = Target("direct", url, headers, svc)


def create_key(cfg: Path) -> str:
    cmd = [
        str(MARGIN), "keys", "create", "--config", str(cfg), "--org", "bench", "--team", "perf",
        "--user", "u1", "--app", "bench", "--env", "dev", "--json",
    ]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    out = r.stdout.decode(errors="replace")
    if r.returncode != 0:
        raise StartupError(f"`{shlex.join(cmd)}` failed ({r.returncode}):\n{out}\n{r.stderr.decode()}")
    m = re.search(r"\{.*\}", out, re.S)
    if m:
        with contextlib.suppress(ValueError):
            key = json.loads(m.group(0)).get("key")
            if isinstance(key, str) and key:
                return key
    m2 = re.search(r"mk-[A-Za-z0-9_\-]+", out)
    if m2:
        return m2.group(0)
    raise StartupError(f"no key in the output of `{shlex.join(cmd)}`:\n{out}")


def start_margin(stack: Stack) -> None:
    assert stack.mock is not None
    mock_port = stack.targets["direct"].url.split(":")[2].split("/")[0]
    cfg = stack.tmp / "margin.yaml"
    config = {
        "admin_key": ADMIN_KEY,
        "providers": [
            {
                "name": "mock",
                "kind": "openai",
                "base_url": f"http://127.0.0.1:{mock_port}/v1",
                "api_key": "sk-mock",
            }
        ],
        "models": [{"name": MODEL, "provider": "mock", "price": {"genai_prices": "openai/gpt-4o-mini"}}],
        "ledger": {"url": f"sqlite:///{stack.tmp}/bench.db", "spool_dir": f"{stack.tmp}/spool"},
    }
    cfg.write_text(yaml.safe_dump(config, sort_keys=False))
    key = create_key(cfg)
    port = free_port()
    cmd = [str(MARGIN), "serve", "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port)]
    svc = Service("margin", cmd, stack.tmp / "logs" / "margin.log")
    stack.services.append(svc)
    svc.start()
    url = f"http://127.0.0.1:{port}{CHAT_PATH}"
    headers = {"content-type": "application/json", "authorization": f"Bearer {key}"}
    wait_ready(svc, url, BODY, headers, timeout_s=60)
    stack.targets["margin"] = Target("margin", url, headers, svc)


def start_litellm(stack: Stack) -> None:
    mock_base = stack.targets["direct"].url.removesuffix(CHAT_PATH) + "/v1"
    config = yaml.safe_load((BENCH / "litellm_config.yaml").read_text())
    for entry in config.get("model_list", []):
        entry.setdefault("litellm_params", {})["api_base"] = mock_base
    cfg = stack.tmp / "litellm_config.yaml"
    cfg.write_text(yaml.safe_dump(config, sort_keys=False))
    port = free_port()
    env = dict(os.environ)
    env.update(
        {
            "LITELLM_LOG": "ERROR",
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no network fetch at start-up
            "LITELLM_MODE": "PRODUCTION",
            "DISABLE_ADMIN_UI": "True",
            "NO_DOCS": "True",
        }
    )
    env.pop("DATABASE_URL", None)
    master_key = "sk-" + secrets.token_hex(32)  # recent LiteLLM refuses to start without one
    env["LITELLM_MASTER_KEY"] = master_key
    cmd = [
        str(LITELLM), "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1",
    ]  # fmt: skip
    svc = Service("litellm", cmd, stack.tmp / "logs" / "litellm.log", env=env)
    stack.services.append(svc)
    svc.start()
    base = f"http://127.0.0.1:{port}"
    wait_ready(svc, base + "/health/liveliness", timeout_s=120)
    url = base + CHAT_PATH
    headers = {"content-type": "application/json", "authorization": f"Bearer {master_key}"}
    wait_ready(svc, url, BODY, headers, timeout_s=30)
    stack.targets["litellm"] = Target("litellm", url, headers, svc)


# --------------------------------------------------------------------------- measuring


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending sequence (q in [0, 100])."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


def run_load(
    stack: Stack, target: Target, rps: float, duration: float, warmup: float, timeout_s: float
) -> dict[str, Any]:
    out = stack.tmp / f"run-{target.name}-{int(rps)}-{time.monotonic_ns()}.json"
    body_file = stack.tmp / "body.json"
    if not body_file.exists():
        body_file.write_bytes(BODY)
    cmd = [
        str(PYTHON), str(LOADGEN), "--url", target.url, "--rps", str(rps), "--duration", str(duration),
        "--warmup", str(warmup), "--body-file", str(body_file), "--timeout", str(timeout_s),
        "--out", str(out),
    ]  # fmt: skip
    for k, v in target.headers.items():
        if k.lower() != "content-type":
            cmd += ["--header", f"{k}: {v}"]
    cpu_before = {s.name: s.cpu() for s in stack.services}
    busy_before, wall_before = machine_busy_seconds(), time.monotonic()
    gen = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdin=subprocess.DEVNULL)
    try:
        rc = gen.wait(timeout=warmup + duration + 2 * timeout_s + 30)
    finally:
        if gen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(gen.pid, signal.SIGKILL)
            gen.wait(timeout=5)
    cpu_after = {s.name: s.cpu() for s in stack.services}
    busy, wall = machine_busy_seconds() - busy_before, time.monotonic() - wall_before
    if rc != 0 or not out.exists():
        raise RuntimeError(f"load generator failed (exit {rc}) for {target.name} at {rps} RPS")
    res: dict[str, Any] = json.loads(out.read_text())
    out.unlink()
    n_total = res["sent"] + round(warmup * rps)
    res["server_cpu_s"] = {k: round(cpu_after[k] - cpu_before.get(k, 0.0), 3) for k in cpu_after}
    ours = sum(res["server_cpu_s"].values()) + res["loadgen_cpu_s"]
    # CPU used by processes outside this benchmark during the run, as % of the whole machine.
    res["foreign_cpu_pct"] = max(0.0, 100.0 * (busy - ours) / (wall * (os.cpu_count() or 1)))
    res["cpu_ms_per_req"] = 1000.0 * res["server_cpu_s"].get(target.server.name, 0.0) / max(1, n_total)
    return res


def summarise(rps: float, runs: list[dict[str, Any]]) -> dict[str, Any]:
    lats = sorted(x for r in runs for x in r["latencies_ms"])
    sent = sum(r["sent"] for r in runs)
    ok = sum(r["ok"] for r in runs)
    span = sum(r["span_s"] for r in runs)
    non200: dict[str, int] = {}
    kinds: dict[str, int] = {}
    for r in runs:
        for k, v in r["non_200"].items():
            non200[k] = non200.get(k, 0) + v
        for k, v in r["error_kinds"].items():
            kinds[k] = kinds.get(k, 0) + v
    errors = sent - ok
    s: dict[str, Any] = {
        "target_rps": rps,
        "sent": sent,
        "ok": ok,
        "errors": errors,
        "error_rate": errors / sent if sent else 1.0,
        "non_200": non200,
        "error_kinds": kinds,
        "achieved_rps": ok / span if span else 0.0,
        "p50_ms": percentile(lats, 50),
        "p90_ms": percentile(lats, 90),
        "p99_ms": percentile(lats, 99),
        "max_ms": lats[-1] if lats else math.nan,
        "cpu_ms_per_req": sum(r["cpu_ms_per_req"] for r in runs) / len(runs),
        "loadgen_cpu_pct": 100.0 * sum(r["loadgen_cpu_s"] for r in runs) / sum(r["loadgen_wall_s"] for r in runs),
        "foreign_cpu_pct": sum(r["foreign_cpu_pct"] for r in runs) / len(runs),
        "send_lag_p99_ms": max((r["send_lag_p99_ms"] or 0.0) for r in runs),
        "rounds_p50_ms": [percentile(sorted(r["latencies_ms"]), 50) for r in runs],
        "rounds_p99_ms": [percentile(sorted(r["latencies_ms"]), 99) for r in runs],
    }
    s["sustained"] = bool(
        s["achieved_rps"] >= MIN_ACHIEVED_FRACTION * rps
        and s["error_rate"] < MAX_ERROR_RATE
        and s["p99_ms"] < MAX_P99_MS
    )
    return s


# --------------------------------------------------------------------------- reporting


def fmt_ms(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.2f}" if abs(x) < 10 else f"{x:.1f}" if abs(x) < 100 else f"{x:.0f}"


def fmt_added(x: float | None) -> str:
    if x is None or math.isnan(x):
        return "-"
    return ("+" if x >= 0 else "") + fmt_ms(x)


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or math.isnan(a) or math.isnan(b) or b <= 0.05:
        return None  # margin's added latency within noise of zero: a ratio means nothing
    return a / b


def compute_added(results: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    rows = []
    for rps_key, by_target in sorted(results.items(), key=lambda kv: float(kv[0])):
        d = by_target.get("direct")
        if d is None:
            continue
        row: dict[str, Any] = {"rps": float(rps_key)}
        for name in ("margin", "litellm"):
            t = by_target.get(name)
            row[f"{name}_added_p50_ms"] = t["p50_ms"] - d["p50_ms"] if t else None
            row[f"{name}_added_p99_ms"] = t["p99_ms"] - d["p99_ms"] if t else None
            if t:
                t["added_p50_ms"] = row[f"{name}_added_p50_ms"]
                t["added_p99_ms"] = row[f"{name}_added_p99_ms"]
        # A ratio only means something where neither proxy is queueing.
        both = all(by_target.get(n, {}).get("sustained") for n in ("margin", "litellm"))
        row["litellm_over_margin_p50"] = (
            ratio(row["litellm_added_p50_ms"], row["margin_added_p50_ms"]) if both else None
        )
        row["litellm_over_margin_p99"] = (
            ratio(row["litellm_added_p99_ms"], row["margin_added_p99_ms"]) if both else None
        )
        rows.append(row)
    return rows


def max_sustained(results: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name in TARGET_ORDER:
        tested = sorted(float(r) for r, bt in results.items() if name in bt)
        if not tested:
            continue
        passing = [r for r in tested if results[_key(r)][name]["sustained"]]
        best = max(passing) if passing else None
        out[name] = {
            "max_sustained_rps": best,
            "highest_tested_rps": tested[-1],
            "lowest_tested_rps": tested[0],
            "next_failed_rps": next((r for r in tested if best is not None and r > best), None),
            "lower_bound_only": best is not None and best == tested[-1],  # never failed: ceiling unknown
        }
    return out


def _key(rps: float) -> str:
    return f"{rps:g}"


def fmt_sustained(m: dict[str, Any]) -> str:
    if m["max_sustained_rps"] is None:
        return f"< {m['lowest_tested_rps']:g} RPS (failed at every level tried)"
    s = f"{m['max_sustained_rps']:g} RPS"
    if m["lower_bound_only"]:
        return f">= {s} (the highest level tried)"
    nxt = m.get("next_failed_rps")
    return f"{s} (failed at {nxt:g})" if nxt is not None else s


def terminal_table(doc: dict[str, Any]) -> Table:
    t = Table(title="margin overhead: open-loop, non-streaming chat, mock upstream", show_lines=False)
    for col in (
        "RPS",
        "target",
        "achieved",
        "p50",
        "p90",
        "p99",
        "max",
        "errors",
        "+p50",
        "+p99",
        "CPU ms/req",
        "ok?",
    ):
        t.add_column(col, justify="left" if col == "target" else "right")
    for rps_key, by_target in sorted(doc["results"].items(), key=lambda kv: float(kv[0])):
        for name in TARGET_ORDER:
            s = by_target.get(name)
            if s is None:
                continue
            t.add_row(
                rps_key,
                name,
                f"{s['achieved_rps']:.0f}",
                fmt_ms(s["p50_ms"]),
                fmt_ms(s["p90_ms"]),
                fmt_ms(s["p99_ms"]),
                fmt_ms(s["max_ms"]),
                f"{s['errors']}" + (f" ({100 * s['error_rate']:.2f}%)" if s["errors"] else ""),
                fmt_added(s.get("added_p50_ms")),
                fmt_added(s.get("added_p99_ms")),
                f"{s['cpu_ms_per_req']:.2f}",
                "yes" if s["sustained"] else "[red]no[/red]",
            )
        t.add_section()
    return t


def markdown_tables(doc: dict[str, Any]) -> str:
    lines = [
        "| RPS | target | achieved RPS | p50 ms | p90 ms | p99 ms | max ms | errors | added p50 | added p99 "
        "| server CPU ms/req | sustained |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for rps_key, by_target in sorted(doc["results"].items(), key=lambda kv: float(kv[0])):
        for name in TARGET_ORDER:
            s = by_target.get(name)
            if s is None:
                continue
            err = f"{s['errors']}" + (f" ({100 * s['error_rate']:.2f}%)" if s["errors"] else "")
            cells = [
                rps_key,
                name,
                f"{s['achieved_rps']:.0f}",
                *(fmt_ms(s[k]) for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms")),
                err,
                fmt_added(s.get("added_p50_ms")),
                fmt_added(s.get("added_p99_ms")),
                f"{s['cpu_ms_per_req']:.2f}",
                "yes" if s["sustained"] else "no",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    if any(r.get("litellm_added_p50_ms") is not None for r in doc["added"]):
        lines += [
            "",
            "| RPS | margin added p50 / p99 ms | LiteLLM added p50 / p99 ms | LiteLLM ÷ margin (p50 / p99) |",
            "|---:|---:|---:|---:|",
        ]
        for r in doc["added"]:
            lines.append(
                f"| {r['rps']:g} "
                f"| {fmt_added(r['margin_added_p50_ms'])} / {fmt_added(r['margin_added_p99_ms'])} "
                f"| {fmt_added(r['litellm_added_p50_ms'])} / {fmt_added(r['litellm_added_p99_ms'])} "
                f"| {fmt_ratio(r['litellm_over_margin_p50'])} / {fmt_ratio(r['litellm_over_margin_p99'])} |"
            )
    lines += ["", "Max sustained RPS (achieved >= 95% of target, errors < 0.1%, p99 < 100 ms):"]
    for name, m in doc["max_sustained"].items():
        lines.append(f"- {name}: {fmt_sustained(m)}")
    return "\n".join(lines)


def fmt_span(xs: Sequence[float]) -> str:
    lo, hi = min(xs), max(xs)
    return fmt_ms(lo) if fmt_ms(lo) == fmt_ms(hi) else f"{fmt_ms(lo)}-{fmt_ms(hi)}"


def fmt_ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f}×"


def reading(doc: dict[str, Any]) -> str:
    """One paragraph, generated from the numbers (so it never disagrees with the table)."""
    parts: list[str] = []
    added = [r for r in doc["added"] if r.get("margin_added_p50_ms") is not None]
    ms = doc["max_sustained"]
    sustained_m = [r for r in added if doc["results"][_key(r["rps"])]["margin"]["sustained"]]
    if sustained_m:
        p50s = [r["margin_added_p50_ms"] for r in sustained_m]
        p99s = [r["margin_added_p99_ms"] for r in sustained_m]
        levels = ", ".join(f"{r['rps']:g}" for r in sustained_m)
        parts.append(
            f"At the loads margin sustained ({levels} RPS) it added {fmt_span(p50s)} ms at p50 "
            f"and {fmt_span(p99s)} ms at p99 over calling the mock directly, "
            "with virtual-key auth and the SQLite ledger metering every request."
        )
    elif added:
        parts.append("margin did not meet the sustained criteria at any tested level on this run.")
    lit = [r for r in added if r.get("litellm_added_p50_ms") is not None]
    if lit:
        both = [
            r for r in lit
            if doc["results"][_key(r["rps"])]["litellm"]["sustained"]
            and doc["results"][_key(r["rps"])]["margin"]["sustained"]
        ]  # fmt: skip
        if both:
            r0 = both[0]
            parts.append(
                f"LiteLLM {LITELLM_VERSION} (one worker, no database, master-key auth only) added "
                f"{fmt_ms(r0['litellm_added_p50_ms'])} ms p50 / "
                f"{fmt_ms(r0['litellm_added_p99_ms'])} ms p99 at "
                f"{r0['rps']:g} RPS, {fmt_ratio(r0['litellm_over_margin_p50'])} margin's p50 overhead."
            )
    sustained = [f"{n} {fmt_sustained(ms[n])}" for n in ("margin", "litellm", "direct") if n in ms]
    parts.append("Max sustained rate (achieved >= 95%, errors < 0.1%, p99 < 100 ms): " + ", ".join(sustained) + ".")
    cpu_bits = []
    for rps_key, bt in sorted(doc["results"].items(), key=lambda kv: float(kv[0])):
        if "margin" in bt and ("litellm" in bt or "litellm" not in ms):
            cpu_bits = [f"{n} {bt[n]['cpu_ms_per_req']:.2f}" for n in ("margin", "litellm") if n in bt]
            cpu_at = rps_key
            break
    cpu_txt = f" (server CPU per request at {cpu_at} RPS: {', '.join(cpu_bits)} ms" if cpu_bits else ""
    top_m = ms.get("margin", {}).get("max_sustained_rps")
    if cpu_txt and top_m is not None and _key(top_m) != cpu_at:
        cpu_txt += (
            f"; margin {doc['results'][_key(top_m)]['margin']['cpu_ms_per_req']:.2f} ms at {top_m:g} RPS, "
            "since each event-loop wake-up (and each ledger commit) then serves several requests"
        )
    cpu_txt += ")" if cpu_txt else ""
    parts.append(
        f"The ceiling here is CPU: load generator, mock and proxies share {doc['machine']['nproc']} cores, "
        f"so a proxy's capacity follows from its CPU cost per request{cpu_txt}. Latency is measured from "
        "each request's scheduled send time, so once a target falls behind, queueing shows up in its "
        "p99 rather than as a lower offered load."
    )
    return " ".join(parts)


def update_markdown(path: Path, section: str) -> None:
    block = f"{MARK_START}\n{section.rstrip()}\n{MARK_END}"
    if path.exists():
        text = path.read_text()
        start, end = text.find(MARK_START), text.find(MARK_END)
        if start != -1 and end != -1 and end > start:
            text = text[:start] + block + text[end + len(MARK_END) :]
        else:
            text = text.rstrip() + "\n\n" + block + "\n"
    else:
        text = f"# margin benchmarks\n\n{block}\n"
    path.write_text(text)


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    commit = "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, timeout=10)
        commit = r.stdout.decode().strip() if r.returncode == 0 else "no commit yet"
        d = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, timeout=10)
        if d.returncode == 0 and d.stdout.strip():
            commit += " (working tree modified)"
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "margin_commit": commit,
    }


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--rps",
        default="25,200,500,1000",
        help="comma-separated RPS levels (25: light load, where a slow proxy is not yet queueing)",
    )
    p.add_argument("--duration", type=float, default=20.0, help="measured s per target and level (all rounds)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds per level")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured s before each measurement")
    p.add_argument("--step-up", default="1500,2000", help="levels tried past the highest --rps while sustained")
    p.add_argument("--budget", type=float, default=360.0, help="s; step-ups that would exceed it are skipped")
    p.add_argument("--targets", default="direct,margin,litellm", help="subset of direct,margin,litellm")
    p.add_argument("--timeout", type=float, default=10.0, help="per-request timeout, s")
    p.add_argument("--mock-arg", action="append", default=[], help="extra argument for margin mock-upstream")
    p.add_argument("--mock-cmd", help="run this upstream instead of the mock ('{port}' is substituted)")
    p.add_argument("--out", type=Path, help="Markdown file whose overhead section is replaced")
    p.add_argument("--json", type=Path, help=f"results JSON path (default {RESULTS_JSON.relative_to(ROOT)})")
    p.add_argument("--quick", action="store_true", help="smoke run: 200 RPS, 5 s, 1 round, no LiteLLM")
    p.add_argument("--from-json", type=Path, help="do not measure: re-render a results JSON from an earlier run")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs, ledger)")
    a = p.parse_args(argv)
    if a.quick:
        a.rps, a.duration, a.rounds, a.step_up = "200", 5.0, 1, ""
        a.targets = ",".join(t for t in a.targets.split(",") if t != "litellm")
    if a.json is None:  # a smoke run must not overwrite the real results
        a.json = RESULTS_JSON.with_name("overhead-quick.json") if a.quick else RESULTS_JSON
    return a


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    levels = sorted({float(x) for x in args.rps.split(",") if x.strip()})
    steps = [float(x) for x in args.step_up.split(",") if x.strip()]
    wanted = [t.strip() for t in args.targets.split(",") if t.strip()]
    bad = [t for t in wanted if t not in TARGET_ORDER]
    if bad or "direct" not in wanted or not levels or args.rounds < 1 or args.duration <= 0:
        console.print(f"[red]bad arguments (targets must include direct; unknown: {bad})[/red]")
        return 2
    per_round = args.duration / args.rounds
    if args.from_json:
        old: dict[str, Any] = json.loads(args.from_json.read_text())
        old["notes"] = [n for n in old["notes"] if not n.startswith("other processes used")]  # now derived
        return finish(old, args)
    signal.signal(signal.SIGTERM, _terminate)
    command = shlex.join([".venv/bin/python", "bench/overhead.py", *(argv if argv is not None else sys.argv[1:])])
    started = time.monotonic()
    loadavg_start = os.getloadavg()
    tmpdir = tempfile.mkdtemp(prefix="margin-bench-")
    stack = Stack(Path(tmpdir))
    results: dict[str, dict[str, dict[str, Any]]] = {}
    raw_rounds: dict[str, dict[str, list[dict[str, Any]]]] = {}
    ok = interrupted = False
    try:
        with console.status("starting mock upstream"):
            start_mock(stack, args.mock_arg, args.mock_cmd)
        if "margin" in wanted:
            with console.status("starting margin gateway"):
                start_margin(stack)
        if "litellm" in wanted:
            if LITELLM.exists():
                with console.status("starting LiteLLM proxy"):
                    start_litellm(stack)
            else:
                stack.notes.append(f"LiteLLM skipped: {LITELLM.relative_to(ROOT)} missing (run bench/setup_litellm.sh)")
        names = [n for n in TARGET_ORDER if n in stack.targets]
        console.print(
            f"targets: {', '.join(names)} | levels {', '.join(f'{x:g}' for x in levels)} RPS | "
            f"{args.rounds} x {per_round:g} s (+{args.warmup:g} s warm-up) each"
        )

        active = list(names)

        def measure(rps: float, targets: list[str], rounds: int) -> None:
            key = _key(rps)
            todo = list(targets)
            for rnd in range(rounds):
                for name in list(todo):
                    waited = settle(stack.services)
                    if waited is None:
                        stack.notes.append(f"servers still busy before {name} at {rps:g} RPS (settle timed out)")
                    t = stack.targets[name]
                    with console.status(f"{rps:g} RPS round {rnd + 1}/{rounds}: {name}"):
                        r = run_load(stack, t, rps, per_round, args.warmup, args.timeout)
                    lat = sorted(r["latencies_ms"])
                    console.print(
                        f"  {rps:>6g} RPS r{rnd + 1} {name:<8} achieved {r['achieved_rps']:7.1f}  "
                        f"p50 {fmt_ms(percentile(lat, 50)):>6}  p99 {fmt_ms(percentile(lat, 99)):>6} ms  "
                        f"errors {r['errors']:<5} "
                        f"loadgen CPU {100 * r['loadgen_cpu_s'] / r['loadgen_wall_s']:3.0f}%  "
                        f"other processes {r['foreign_cpu_pct']:3.0f}%"
                    )
                    raw_rounds.setdefault(key, {}).setdefault(name, []).append(r)
                    for svc in stack.services:
                        if not svc.alive():
                            raise RuntimeError(f"{svc.name} died during the run:\n{svc.tail()}")
                    err_rate = r["errors"] / max(1, r["sent"])
                    if name != "direct" and (
                        r["achieved_rps"] < OVERLOAD_ACHIEVED_FRACTION * rps or err_rate > OVERLOAD_ERROR_RATE
                    ):
                        # Hopelessly overloaded (most requests time out). Its backlog would keep
                        # burning the shared CPUs during the next measurements, so stop it now
                        # and do not run it again at this or any higher level.
                        todo.remove(name)
                        if name in active:
                            active.remove(name)
                        stack.retire(name)
                        stack.notes.append(
                            f"{name} overloaded at {rps:g} RPS (achieved {r['achieved_rps']:.0f}, "
                            f"errors {100 * err_rate:.0f}%): stopped, not run at higher levels"
                        )
            for name, runs in raw_rounds[key].items():  # includes targets retired mid-level
                results.setdefault(key, {})[name] = summarise(rps, runs)

        for rps in levels:
            if len(active) > 1 or len(names) == 1:  # stop once every proxy has been dropped
                measure(rps, active, args.rounds)

        # Step-up search past the highest level, for targets still sustaining it (direct always
        # comes along as the baseline). One round each; skipped if it would blow the budget.
        top = max(levels)
        stepping = [n for n in active if n != "direct" and results[_key(top)][n]["sustained"]]
        for rps in (s for s in steps if s > top):
            if not stepping:
                break
            cost = (len(stepping) + 1) * (per_round + args.warmup + 3.0)
            if time.monotonic() - started + cost > args.budget:
                stack.notes.append(f"step-up to {rps:g} RPS skipped (time budget {args.budget:g} s)")
                break
            measure(rps, ["direct", *stepping], 1)
            stepping = [n for n in stepping if results[_key(rps)][n]["sustained"]]
        ok = True
    except KeyboardInterrupt:
        interrupted = True
        console.print("[yellow]interrupted; stopping everything[/yellow]")
    except StartupError as e:
        console.print(f"[red]start-up failed:[/red] {e}")
    finally:
        with console.status("stopping services"):
            stack.stop()
        if args.keep_tmp or not (ok or interrupted):
            console.print(f"temp dir kept: {tmpdir}")
        else:
            subprocess.run(["rm", "-rf", tmpdir], check=False)
    if not ok:
        return 1

    doc: dict[str, Any] = {
        "command": command,
        "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(),
        "settings": {
            "levels_rps": levels,
            "step_up_rps": steps,
            "rounds": args.rounds,
            "measured_s_per_round": per_round,
            "warmup_s": args.warmup,
            "request": BODY.decode(),
            "mock": stack.mock_cmd,
            "litellm": LITELLM_VERSION if "litellm" in stack.targets else None,
        },
        "results": results,
        "notes": stack.notes,
        "loadavg_start": loadavg_start,
        "loadavg_end": os.getloadavg(),
        "wall_s": round(time.monotonic() - started, 1),
    }
    doc["rounds"] = {
        k: {n: [{kk: vv for kk, vv in r.items() if kk != "latencies_ms"} for r in rs] for n, rs in v.items()}
        for k, v in raw_rounds.items()
    }
    return finish(doc, args)


def derived_notes(doc: dict[str, Any]) -> list[str]:
    notes = []
    results = doc["results"]
    foreign = [s["foreign_cpu_pct"] for bt in results.values() for s in bt.values()]
    if foreign and max(foreign) > FOREIGN_CPU_WARN_PCT:
        notes.append(
            f"other processes used up to {max(foreign):.0f}% of the machine's CPU during some runs "
            f"(mean {sum(foreign) / len(foreign):.0f}%; load average {doc['loadavg_start'][0]:.1f} at start): "
            "expect noisy tails"
        )
    busy_gen = sorted(
        {float(k) for k, bt in results.items() for s in bt.values() if s["loadgen_cpu_pct"] > LOADGEN_CPU_WARN_PCT}
    )
    if busy_gen:
        notes.append(
            "the load generator itself needed > "
            f"{LOADGEN_CPU_WARN_PCT:.0f}% of a core at {', '.join(f'{x:g}' for x in busy_gen)} RPS: "
            "there the box, not only the target, is the limit"
        )
    return notes


def finish(doc: dict[str, Any], args: argparse.Namespace) -> int:
    """Derive added latency, max sustained RPS and the reading; print; write JSON and Markdown."""
    doc["derived_notes"] = derived_notes(doc)
    doc["added"] = compute_added(doc["results"])
    doc["max_sustained"] = max_sustained(doc["results"])
    doc["reading"] = reading(doc)

    console.print(terminal_table(doc))
    for r in doc["added"]:
        if r.get("litellm_added_p50_ms") is not None and r.get("margin_added_p50_ms") is not None:
            console.print(
                f"{r['rps']:>6g} RPS  LiteLLM added ÷ margin added: "
                f"p50 {fmt_ratio(r['litellm_over_margin_p50'])}"
                f"  p99 {fmt_ratio(r['litellm_over_margin_p99'])}"
            )
    for name, m in doc["max_sustained"].items():
        console.print(f"max sustained {name}: {fmt_sustained(m)}")
    for n in doc["notes"] + doc["derived_notes"]:
        console.print(f"[yellow]note:[/yellow] {n}")
    console.print(doc["reading"])

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    console.print(f"wrote {args.json}")
    if args.out:
        update_markdown(args.out, markdown_section(doc))
        console.print(f"updated {args.out}")
    return 0


def markdown_section(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    s = doc["settings"]
    notes = "".join(f"\n- {n}" for n in doc["notes"] + doc.get("derived_notes", []))
    levels = ", ".join(f"{x:g}" for x in s["levels_rps"])
    steps = ", ".join(f"{x:g}" for x in s["step_up_rps"]) or "none"
    return f"""## Gateway overhead

Added latency of a non-streaming chat call through margin (virtual-key auth, pricing and the SQLite
ledger all on) versus calling the mock upstream directly, and versus a LiteLLM proxy in front of the
same mock. Open-loop load (requests scheduled every 1/RPS s; latency from the scheduled send time),
rounds interleaved direct → margin → LiteLLM; added = target percentile − direct percentile at the
same RPS.

- Command: `{doc["command"]}`
- Date: {doc["date_utc"]} (whole run {doc["wall_s"]:.0f} s)
- Machine: {m["nproc"]} CPUs, {m["cpu"]}, Python {m["python"]}, margin commit {m["margin_commit"]}
- Load: {levels} RPS (step-up: {steps}), \
{s["rounds"]} round(s) × {s["measured_s_per_round"]:g} s measured after {s["warmup_s"]:g} s warm-up, \
per target and level; LiteLLM {s["litellm"] or "not run"}
- Request: `{s["request"]}`{notes}

{markdown_tables(doc)}

{doc["reading"]}
"""


if __name__ == "__main__":
    sys.exit(main())
