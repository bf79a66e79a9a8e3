"""Process plumbing for the overhead benchmark: servers in their own process groups, readiness
polling, CPU sampling from /proc, waiting for idle, and a description of the machine."""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import ROOT


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


def kill_group(pid: int, sig: signal.Signals = signal.SIGKILL) -> None:
    """Signal the process group led by `pid`; no error if it is already gone."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


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
        kill_group(p.pid, signal.SIGTERM)
        try:
            p.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            kill_group(p.pid)
            p.wait(timeout=5)
        # Workers that outlived their parent (uvicorn --workers) share the group.
        kill_group(p.pid)


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
