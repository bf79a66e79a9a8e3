"""The servers under test (mock upstream, margin gateway, LiteLLM proxy) and one load-generator
run against one of them, with the CPU each process used meanwhile."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shlex
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from common import BENCH, BODY, CHAT_PATH, LITELLM, LOADGEN, MARGIN, MODEL, PYTHON, ROOT, console
from procs import Service, StartupError, command_works, free_port, kill_group, machine_busy_seconds, wait_ready

ADMIN_KEY = "bench-admin"


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


def start_margin(stack: Stack, name: str = "margin", extra: dict[str, Any] | None = None) -> None:
    """A gateway in front of the mock; `extra` adds config (budgets, state, ...) under target `name`."""
    assert stack.mock is not None
    mock_port = stack.targets["direct"].url.split(":")[2].split("/")[0]
    cfg = stack.tmp / f"{name}.yaml"
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
        "ledger": {"url": f"sqlite:///{stack.tmp}/{name}.db", "spool_dir": f"{stack.tmp}/spool-{name}"},
        **(extra or {}),
    }
    cfg.write_text(yaml.safe_dump(config, sort_keys=False))
    key = create_key(cfg)
    port = free_port()
    cmd = [str(MARGIN), "serve", "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port)]
    svc = Service(name, cmd, stack.tmp / "logs" / f"{name}.log")
    stack.services.append(svc)
    svc.start()
    url = f"http://127.0.0.1:{port}{CHAT_PATH}"
    headers = {"content-type": "application/json", "authorization": f"Bearer {key}"}
    wait_ready(svc, url, BODY, headers, timeout_s=60)
    stack.targets[name] = Target(name, url, headers, svc)


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
            kill_group(gen.pid)
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
