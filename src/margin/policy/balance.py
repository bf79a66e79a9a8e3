"""Which replica of a self-hosted pool serves a request (pure: load snapshots in, a choice out).

Load is what the replica itself reports (queue + running, scraped from its Prometheus metrics or
llama.cpp's /slots) corrected by what margin did since that scrape: requests it started there
since (not yet in the numbers) minus those that finished since. A replica whose scrape failed is
`unknown`: only margin's own in-flight count is known. One that refused connections is `down` and
gets nothing while another can serve.

Prefix affinity: requests of one conversation (the `X-Margin-Run-Id`, else a hash of the system
prompt and the first user turn) go to one replica, chosen by rendezvous hashing, so that its KV /
prefix cache holds their shared prefix; adding or removing a replica moves only the conversations
of that replica. Affinity yields to load when the affinity replica has more than `slack` requests
beyond the least-loaded one, or when the request would queue there (the engine reports waiting
requests, or every slot busy) but start at once elsewhere: a warm cache is worth less than a queue.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from margin.domain import responses

ReplicaStatus = Literal["up", "unknown", "down"]
Strategy = Literal["least-loaded", "round-robin"]
_KEY_CHARS = 4096  # enough of a prompt to identify its shared prefix


@dataclass(frozen=True, slots=True)
class ReplicaLoad:
    """One replica as the balancer sees it at decision time."""

    name: str
    status: ReplicaStatus = "unknown"
    waiting: float = 0.0  # scraped: requests queued in the engine
    running: float = 0.0  # scraped: requests being served (in a batch / slot)
    kv_usage: float | None = None  # scraped: KV-cache use, 0..1 (a tie-breaker)
    sent_since_scrape: int = 0  # margin's requests started on it after the scrape
    done_since_scrape: int = 0  # margin's requests that finished after the scrape
    inflight: int = 0  # margin's requests open on it now
    slots: int | None = None  # how many requests it serves at once, where it says (llama.cpp /slots)

    @property
    def saturated(self) -> bool:
        """A new request would wait here: the engine queues, or every slot is taken."""
        if self.status != "up":
            return False
        return self.waiting > 0 or (self.slots is not None and self.load >= self.slots)

    @property
    def load(self) -> float:
        """Requests in the replica (queued + running), best estimate now."""
        if self.status != "up":
            return float(self.inflight)
        scraped = self.waiting + self.running + self.sent_since_scrape - self.done_since_scrape
        return max(float(self.inflight), scraped)


@dataclass(frozen=True, slots=True)
class Choice:
    replica: str
    why: str
    load: float  # the chosen replica's load when chosen
    affinity: bool = False  # served by its conversation's affinity replica


def _h(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def rendezvous(key: str, names: Sequence[str]) -> list[str]:
    """`names` by decreasing rendezvous weight for `key` (highest-random-weight hashing)."""
    return sorted(names, key=lambda n: (_h(f"{key}\x00{n}"), n), reverse=True)


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: their text, in order
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def affinity_key(endpoint: str, payload: Mapping[str, Any], run_id: str | None = None) -> str | None:
    """The conversation a request belongs to: its run id when the client gave one; else, for a
    chat, a hash of the leading system/developer prompts and the first user turn (what every later
    turn of the conversation repeats); for a completion, of the prompt's first characters. None
    when there is nothing to share (embeddings, empty prompts)."""
    if run_id:
        return "run:" + run_id
    if endpoint in ("chat", "response"):
        parts: list[str] = []
        for m in (payload.get("messages") if endpoint == "chat" else responses.as_messages(payload)) or ():
            if not isinstance(m, dict):
                break
            role = str(m.get("role") or "")
            parts.append(f"{role}\x1f{_text(m.get('content'))[:_KEY_CHARS]}")
            if role not in ("system", "developer"):
                break  # the first non-system turn closes the key
        return "chat:" + hashlib.blake2b("\x1e".join(parts).encode(), digest_size=12).hexdigest() if parts else None
    if endpoint == "completion":
        p = payload.get("prompt")
        text = p if isinstance(p, str) else (p[0] if isinstance(p, list) and p and isinstance(p[0], str) else "")
        return "prompt:" + hashlib.blake2b(text[:_KEY_CHARS].encode(), digest_size=12).hexdigest() if text else None
    return None


def choose(replicas: Sequence[ReplicaLoad], *, strategy: Strategy = "least-loaded", key: str | None = None,
           affinity: bool = True, slack: float = 2.0, turn: int = 0) -> Choice:
    """The replica for one request. `turn` (a per-pool request counter) rotates round-robin and
    spreads ties between equally loaded replicas when there is no affinity key."""
    if not replicas:
        raise ValueError("a pool needs at least one replica")
    live = [r for r in replicas if r.status != "down"]
    note = ""
    if not live:  # every replica refused connections lately: try them anyway (one may be back)
        live, note = list(replicas), "; all replicas down"
    n = len(live)
    if strategy == "round-robin":
        r = live[turn % n]
        return Choice(r.name, f"round-robin{note}", r.load)
    order = {name: i for i, name in enumerate(rendezvous(key, [r.name for r in live]))} if key else None

    def rank(i: int, r: ReplicaLoad) -> tuple[float, float, int]:
        tie = order[r.name] if order is not None else (i - turn) % n
        return (r.load, r.kv_usage if r.kv_usage is not None else 0.0, tie)

    least = min(range(n), key=lambda i: rank(i, live[i]))
    best = live[least]
    if key is not None and affinity and order is not None:
        pref = next(r for r in live if order[r.name] == 0)
        queues = pref.saturated and not best.saturated
        if pref.load <= best.load + slack and not queues:
            why = "affinity" if pref is best else f"affinity (load {pref.load:g}, least {best.load:g})"
            return Choice(pref.name, why + note, pref.load, affinity=True)
        busier = "full" if queues else "busier"
        return Choice(best.name, f"least-loaded (affinity replica {pref.name} {busier}: {pref.load:g} vs "
                                 f"{best.load:g}){note}", best.load)
    return Choice(best.name, f"least-loaded (load {best.load:g}){note}", best.load)
