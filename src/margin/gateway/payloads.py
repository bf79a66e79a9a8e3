"""Payload logging: prompts and completions are stored only for keys that opt in.

Off by default. A key opts in with the key tag `log_payloads=true` (set by an administrator:
request headers cannot set it, see request.RESERVED_TAGS). Then the request body and the response
text of each call are written to the ledger database's `payloads` table (one row per event id),
after secrets are redacted: API-key-like strings (sk-..., mk-..., AKIA..., GitHub/Slack/Google
tokens), bearer tokens, JWTs, PEM private keys, e-mail addresses, payment card numbers (Luhn-checked)
and phone numbers.

Capture never blocks a request: rows go through a bounded queue to one task that writes batches
with its own connection (the ledger writer's path stays as it is). Payloads are a convenience, not
the ledger: when the queue is full or the database stays down, rows are dropped and counted, and
nothing about a dropped row (least of all its text) is logged.

Regexes rather than a scanner library: detect-secrets and friends scan files for review, this
needs a single fast substitution pass over strings, with replacements that say what was removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sqlite3
import threading
from datetime import UTC, datetime
from typing import Any

import orjson

from margin.domain import Call

log = logging.getLogger("margin.payloads")

OPT_IN_TAG = ("log_payloads", "true")

_PATTERNS: tuple[tuple[str, str], ...] = (
    ("private_key", r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----"),
    ("bearer_token", r"(?i:\bbearer)\s+[A-Za-z0-9\-._~+/]{8,}=*"),
    ("jwt", r"\beyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}"),
    ("api_key", r"\b(?:sk|mk|pk|rk)-[A-Za-z0-9_\-]{16,}"),  # OpenAI/Anthropic (sk-ant-...), margin (mk-...)
    ("aws_access_key", r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[0-9A-Z]{16}\b"),
    ("github_token", r"\b(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{40,})"),
    ("slack_token", r"\bxox[abposr]-[A-Za-z0-9\-]{10,}"),
    ("google_api_key", r"\bAIza[0-9A-Za-z_\-]{35}"),
    ("email", r"\b[A-Za-z0-9._%+\-]+@[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}\b"),
    # Added for distillation exports (issue 11). Card numbers: 13-19 digits, spaces or dashes allowed,
    # kept only if the Luhn check passes (so order numbers mostly survive). Phones: international
    # (+country ...) or North American (555) 123-4567 / 555-123-4567 shapes, not bare digit runs,
    # so arithmetic in prompts is left alone.
    ("card_number", r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])"),
    ("phone", r"(?<![\w+])\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]?\d{2,4}){1,4}\b"
              r"|(?<![\w(])(?:\(\d{3}\)\s?|\d{3}[ .-])\d{3}[ .-]\d{4}\b"),
)
_SECRETS = re.compile("|".join(f"(?P<{name}>{rx})" for name, rx in _PATTERNS))


def _luhn(text: str) -> bool:
    digits = [int(c) for c in text if c.isdigit()]
    total = sum(d if i % 2 == 0 else (d * 2 - 9 if d > 4 else d * 2) for i, d in enumerate(reversed(digits)))
    return total % 10 == 0


def _mark(m: re.Match[str]) -> str:
    if m.lastgroup == "card_number" and not _luhn(m.group(0)):
        return m.group(0)
    return f"[REDACTED:{m.lastgroup}]"


def redact(text: str) -> str:
    """`text` with every secret-looking substring replaced by `[REDACTED:<kind>]`."""
    return _SECRETS.sub(_mark, text)


def redact_obj(obj: Any) -> Any:
    """Redact every string inside a JSON-like value (message contents, tool arguments, `user`...)."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {k: redact_obj(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [redact_obj(v) for v in obj]
    return obj


def opted_in(call: Call) -> bool:
    return OPT_IN_TAG in call.attribution.tags


PayloadRow = tuple[str, bytes, bytes, datetime]


class _SqliteSink:
    def __init__(self, path: str):
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def _write(self, rows: list[tuple[str, str, str, str]]) -> None:
        with self._lock:
            if self._conn is None:
                self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=2)
            c = self._conn
            c.execute("BEGIN IMMEDIATE")
            try:
                c.executemany("INSERT OR IGNORE INTO payloads (event_id, request, response, ts) VALUES (?, ?, ?, ?)",
                              rows)
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise

    async def write(self, rows: list[PayloadRow]) -> None:
        text = [(e, req.decode(), resp.decode(), ts.isoformat()) for e, req, resp, ts in rows]
        await asyncio.to_thread(self._write, text)

    async def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


class _PostgresSink:
    def __init__(self, url: str):
        self.url = url
        self._pool: Any = None

    async def write(self, rows: list[PayloadRow]) -> None:
        import asyncpg

        if self._pool is None:
            self._pool = await asyncpg.create_pool(self.url, min_size=1, max_size=2, timeout=5, command_timeout=30)
        await self._pool.executemany(
            "INSERT INTO payloads (event_id, request, response, ts) VALUES ($1::uuid, $2::jsonb, $3::jsonb, $4) "
            "ON CONFLICT (event_id) DO NOTHING",
            [(e, req.decode(), resp.decode(), ts) for e, req, resp, ts in rows])

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), 5)
            except Exception:
                pool.terminate()


def _sink(ledger_url: str) -> _SqliteSink | _PostgresSink:
    if ledger_url.startswith("sqlite:"):
        from margin.ledger.sqlite import sqlite_path

        return _SqliteSink(sqlite_path(ledger_url))
    return _PostgresSink(ledger_url)


class PayloadLog:
    """Queue and writer of opted-in payloads. `capture` is the hook the pipeline calls once a call
    has its answer (complete text, or what was delivered of a broken stream)."""

    def __init__(self, ledger_url: str, queue_size: int = 10_000, batch_size: int = 200,
                 retry_interval_s: float = 1.0):
        self._sink = _sink(ledger_url)
        self._q: asyncio.Queue[tuple[str, Any, str, datetime] | None] = asyncio.Queue(maxsize=queue_size)
        self.batch_size = batch_size
        self.retry_interval_s = retry_interval_s
        self.written = 0
        self.dropped = 0
        self._task: asyncio.Task[None] | None = None

    def capture(self, call: Call, event_id: str, request: Any, response_text: str) -> None:
        if not opted_in(call):
            return
        try:
            # Redaction happens in the writer task, off the request path.
            self._q.put_nowait((event_id, request, response_text, datetime.now(UTC)))
        except asyncio.QueueFull:
            self.dropped += 1

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="payload-log")

    async def close(self, timeout_s: float = 5.0) -> None:
        if self._task is None:
            return
        with contextlib.suppress(asyncio.QueueFull):
            self._q.put_nowait(None)
        try:
            await asyncio.wait_for(self._task, timeout_s)
        except TimeoutError:
            self._task.cancel()
        self._task = None
        await self._sink.close()

    async def flush(self, timeout_s: float = 10.0) -> None:
        """Wait (bounded) until everything captured so far is written or dropped (tests)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while (self._q.qsize() or self._busy) and loop.time() < deadline:
            await asyncio.sleep(0.01)

    _busy = False

    async def _run(self) -> None:
        pending: list[PayloadRow] = []
        stopping = False
        while not stopping or pending:
            if not pending:
                item = await self._q.get()
                if item is None:
                    return
                batch = [item]
                while len(batch) < self.batch_size:
                    try:
                        nxt = self._q.get_nowait()
                    except asyncio.QueueEmpty:
                        break
                    if nxt is None:
                        stopping = True
                        break
                    batch.append(nxt)
                self._busy = True
                pending = [(e, orjson.dumps(redact_obj(req)), orjson.dumps({"text": redact(text)}), ts)
                           for e, req, text, ts in batch]
            try:
                await self._sink.write(pending)
                self.written += len(pending)
                pending = []
                self._busy = False
            except Exception as e:  # table not migrated yet, database down: retry, bounded
                # Only the error's type and text: never a row's contents.
                log.warning("payload log: could not write %d rows, retrying: %s: %s", len(pending),
                            type(e).__name__, e)
                if stopping or self._q.full():
                    self.dropped += len(pending)
                    pending = []
                    self._busy = False
                    continue
                await asyncio.sleep(self.retry_interval_s)
