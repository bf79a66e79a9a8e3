"""Private copies of the services a margin cluster needs, each a real process on a free loopback
port in a temporary directory: PostgreSQL (initdb + pg_ctl), Redis, nginx, mock upstreams and
margin replicas. Never the machine's own services: fault tests stop and restart these."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

PY = sys.executable


class ServiceError(RuntimeError):
    """A service would not start (the message says which and ends with its log tail)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


@dataclass
class Proc:
    """A child process in its own process group, logging to a file."""

    name: str
    cmd: list[str]
    log: Path
    env: dict[str, str] | None = None
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.popen = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                          env=self.env, start_new_session=True)

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs (what a crash or the OOM killer does)."""
        if self.popen is not None:
            self.signal(signal.SIGKILL)
            self.popen.wait(10)

    def stop(self, grace_s: float = 15.0) -> None:
        if not self.alive():
            return
        assert self.popen is not None
        self.signal(signal.SIGTERM)
        try:
            self.popen.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.kill()

    def rss_kb(self) -> int:
        """Resident memory of the process (VmRSS), 0 if gone."""
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        except (OSError, AssertionError):
            pass
        return 0

    def wait_http(self, url: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise ServiceError(f"{self.name} exited while starting:\n{_tail(self.log)}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=1.0).status_code < 500:
                    return
            time.sleep(0.1)
        raise ServiceError(f"{self.name} did not answer {url} within {timeout_s:.0f} s:\n{_tail(self.log)}")


def pg_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin")) if Path("/usr/lib/postgresql").exists() else []
    if not found or not (found[-1] / "initdb").exists():
        raise ServiceError("PostgreSQL server binaries (initdb, pg_ctl) are missing: apt-get install postgresql")
    return found[-1]


class PrivatePostgres:
    """A throwaway cluster: initdb in a temp dir, its own port, trust auth, fsync off (tests)."""

    def __init__(self, root: Path, max_connections: int = 200):
        self.bin = pg_bin()
        self.dir = root / "postgres"
        self.dir.mkdir(parents=True)
        self.port = free_port()
        self.max_connections = max_connections
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        self._pg("initdb", "-D", str(self.dir / "data"), "-A", "trust", "-U", "postgres", "--no-sync")
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _pg(self, tool: str, *args: str) -> None:
        cmd = [str(self.bin / tool), *args]
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        r = subprocess.run(cmd, capture_output=True, timeout=120)
        if r.returncode != 0:
            raise ServiceError(f"{tool} failed: {r.stderr.decode(errors='replace')}\n{_tail(self.dir / 'log')}")

    def start(self) -> None:
        self._pg("pg_ctl", "-D", str(self.dir / "data"), "-l", str(self.dir / "log"), "-w", "-o",
                 f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
                 f"-c max_connections={self.max_connections}", "start")

    def crash(self) -> None:
        """Stop it the way a crash would (`-m immediate`: no clean shutdown, no checkpoint)."""
        self._pg("pg_ctl", "-D", str(self.dir / "data"), "-m", "immediate", "-w", "stop")

    @property
    def up(self) -> bool:
        return port_open(self.port)

    def destroy(self) -> None:
        with contextlib.suppress(ServiceError, subprocess.SubprocessError):
            if self.up:
                self.crash()


class PrivateRedis:
    """redis-server with no persistence: a restart comes back empty, as a crashed cache would."""

    def __init__(self, root: Path):
        if not shutil.which("redis-server"):
            raise ServiceError("redis-server is missing: apt-get install redis-server")
        self.dir = root / "redis"
        self.dir.mkdir(parents=True)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = Proc("redis", ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                   "--appendonly", "no", "--dir", str(self.dir)], self.dir / "redis.log")

    def start(self) -> None:
        self.proc.start()
        deadline = time.monotonic() + 20
        while not port_open(self.port):
            if not self.proc.alive() or time.monotonic() > deadline:
                raise ServiceError(f"redis did not start:\n{_tail(self.proc.log)}")
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.stop()

    def restart(self, down_s: float = 0.0) -> None:
        """Down (SIGKILL: no save) and up again, empty."""
        self.proc.kill()
        time.sleep(down_s)
        self.start()


NGINX_CONF = """\
{user}worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
daemon off;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream margin {{
        least_conn;
{servers}
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size {max_body};
        location / {{
            proxy_pass http://margin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For $remote_addr;
            # SSE: pass each chunk on as it comes, never buffer a streamed answer.
            proxy_buffering off;
            proxy_read_timeout 600s;
            proxy_connect_timeout 1s;
            # A POST is only re-sent to another replica if the first could not be reached
            # (nginx never repeats a non-idempotent request it already delivered).
            proxy_next_upstream error timeout;
            proxy_next_upstream_tries 3;
        }}
    }}
}}
"""


@dataclass
class Nginx:
    """A private nginx (the Debian package's binary, our own config and prefix)."""

    root: Path
    backends: list[int]
    max_body: str = "8m"
    port: int = field(default_factory=free_port)
    proc: Proc | None = None

    def conf(self) -> str:
        servers = "\n".join(f"        server 127.0.0.1:{p} max_fails=1 fail_timeout=2s;" for p in self.backends)
        user = "user root root;\n" if os.geteuid() == 0 else ""
        return NGINX_CONF.format(user=user, dir=self.root, servers=servers, port=self.port, max_body=self.max_body)

    def start(self) -> None:
        exe = shutil.which("nginx") or "/usr/sbin/nginx"
        if not Path(exe).exists():
            raise ServiceError("nginx is missing: apt-get install nginx (make services installs it)")
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "nginx.conf").write_text(self.conf())
        self.proc = Proc("nginx", [exe, "-p", str(self.root), "-c", str(self.root / "nginx.conf")],
                         self.root / "nginx.out")
        self.proc.start()
        deadline = time.monotonic() + 20
        while not port_open(self.port):
            if not self.proc.alive() or time.monotonic() > deadline:
                raise ServiceError(f"nginx did not start:\n{_tail(self.root / 'error.log')}\n{_tail(self.proc.log)}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()


def mock_proc(root: Path, name: str, port: int, options: dict[str, Any]) -> Proc:
    args = ", ".join(f"{k}={v!r}" for k, v in options.items())
    code = (f"from margin.providers.mock_upstream import serve, MockOptions; "
            f"serve('127.0.0.1', {port}, MockOptions({args}))")
    return Proc(f"mock-{name}", [PY, "-c", code], root / "logs" / f"mock-{name}.log")
