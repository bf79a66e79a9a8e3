"""The levers a replay pulls, each on the trace's clock: routing (the gateway's `route.decide`,
called once per distinct feature combination and broadcast), the exact cache (the gateway's key,
an LRU with TTL like `state.cache.MemoryCache`), and the provider's prefix cache from `hash_ids`."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from margin.domain import Call, RouteDecision
from margin.policy import learned as learned_policy
from margin.policy import route
from margin.replay.policy import PrefixCache


def factorize(*cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Codes 0..k-1 for the distinct rows of ``cols`` (equal length), and the index of each code's
    first row. Integer columns are packed into one int64 key when their ranges allow (one sort);
    otherwise columns are combined pairwise, each step factorized, so no key can overflow
    (np.unique(axis=0) on stacked columns is ~10x slower on a million rows)."""
    n = cols[0].shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    cols = tuple(_codes(c) if c.dtype.kind == "O" else c for c in cols)
    spans = []
    for c in cols:
        if c.dtype.kind not in "iub":
            break
        lo, hi = int(c.min()), int(c.max())
        spans.append((lo, hi - lo + 1))
    if len(spans) == len(cols) and _product([s for _, s in spans]) < 2**62:
        key = np.zeros(n, dtype=np.int64)
        for c, (lo, span) in zip(cols, spans, strict=True):
            key = key * span + (c.astype(np.int64) - lo)
    else:
        key = np.zeros(n, dtype=np.int64)
        for c in cols:
            _, inv = np.unique(c, return_inverse=True)
            inv = inv.astype(np.int64).reshape(-1)
            _, key = np.unique(key * (int(inv.max()) + 1) + inv, return_inverse=True)
            key = key.astype(np.int64).reshape(-1)
    uniq, codes = np.unique(key, return_inverse=True)
    codes = codes.astype(np.int64).reshape(-1)
    first = np.full(uniq.shape[0], n, dtype=np.int64)
    np.minimum.at(first, codes, np.arange(n, dtype=np.int64))
    return codes, first


def _codes(col: np.ndarray) -> np.ndarray:
    """Integer codes for an object column (strings): a dict pass beats sorting Python objects."""
    seen: dict[Any, int] = {}
    return np.fromiter((seen.setdefault(v, len(seen)) for v in col.tolist()), dtype=np.int64, count=col.shape[0])


def _product(xs: list[int]) -> int:
    out = 1
    for x in xs:
        out *= x
    return out


@dataclass
class Routed:
    """Per request: the served model's index in ``models`` (-1: refused), a reason index, and an
    index into ``chains``: the decision's model then its fallbacks (a cascade's steps)."""

    model: np.ndarray
    reason: np.ndarray
    chain: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    chains: list[tuple[int, ...]] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    refusals: dict[str, int] = field(default_factory=dict)  # code -> count
    learned_without_prompt: int = 0
    decide_calls: int = 0


class Learner:
    """A learned group's router, asked per prompt. Mirrors `gateway/pipeline.Pipeline._learned`:
    success probabilities from the artefact, costs on the artefact's own scale, then the pure
    `policy.learned.choose_op` at the artefact's operating point."""

    def __init__(self, path: str, names: Mapping[str, str], base_dir: Path | None = None):
        from margin.router.artefact import load_router  # scikit-learn only when a policy uses it

        p = Path(path)
        if not p.is_absolute() and not p.exists() and base_dir is not None:
            p = base_dir / p
        self.router = load_router(p)
        self.names = dict(names)

    def verdict(self, text: str, targets: Mapping[str, route.Target], allowed: tuple[str, ...]) -> route.Learned | None:
        names = self.names
        probs = {names.get(m, m): p for m, p in self.router.predict(text).items()}
        fits = {m for m in probs if m in targets and (not allowed or m in allowed)}
        costs = {names.get(m, m): c for m, c in self.router.estimate_costs(text).items() if names.get(m, m) in fits}
        if not costs:
            return None
        probs = {m: p for m, p in probs.items() if m in costs}
        op = self.router.operating_point
        chosen = learned_policy.choose_op(probs, costs, op)
        return route.Learned(chosen, learned_policy.reason(
            probs, costs, chosen, lam=op["value"] if op.get("rule") == "lambda" else None,
            threshold=op["value"] if op.get("rule") == "threshold" else None).removeprefix("learned: "))


def route_all(calls: Sequence[Call], combo: np.ndarray, prompt_tokens: np.ndarray, max_tokens: np.ndarray,
              models: Sequence[str], targets: Mapping[str, route.Target], groups: Mapping[str, route.Group],
              learners: Mapping[str, Learner], prompts: Sequence[str | None] | None, seed: int,
              progress: Callable[[int], None] | None = None) -> Routed:
    """``calls[c]`` is the call summary of attribution/model combination ``c``; ``combo`` maps each
    request to one. Decisions that depend only on (combination, prompt tokens, max tokens) are made
    once per distinct triple; weighted groups draw per request and learned groups read each prompt."""
    n = combo.shape[0]
    index = {m: i for i, m in enumerate(models)}
    out = Routed(np.full(n, -1, dtype=np.int64), np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64))
    reason_ix: dict[str, int] = {}
    chain_ix: dict[tuple[int, ...], int] = {(): 0}

    def put(rows: np.ndarray | int, d: RouteDecision | route.Refusal) -> None:
        if isinstance(d, route.Refusal):
            out.refusals[d.code] = out.refusals.get(d.code, 0) + int(np.size(rows))
            text = f"refused: {d.code}"
        else:
            out.model[rows] = index[d.model]
            text = d.reason
            steps = tuple(index[m] for m in (d.model, *d.fallbacks) if m in index)
            out.chain[rows] = chain_ix.setdefault(steps, len(chain_ix))
        out.reason[rows] = reason_ix.setdefault(text, len(reason_ix))

    strategy = np.array([groups[c.requested_model].strategy if c.requested_model in groups else ""
                         for c in calls], dtype=object)
    per_request = np.isin(strategy[combo], ["weighted", "learned"]) if n else np.zeros(0, dtype=bool)
    # Only group requests read the prompt size; a concrete model is served as asked whatever it is.
    is_group = (strategy != "")[combo] if n else np.zeros(0, dtype=bool)
    size = np.where(is_group, prompt_tokens, 0)
    bulk = np.flatnonzero(~per_request)
    if bulk.size:
        codes, first = factorize(combo[bulk], size[bulk], max_tokens[bulk])
        order = np.argsort(codes, kind="stable")
        bounds = np.searchsorted(codes[order], np.arange(first.shape[0] + 1))
        for u in range(first.shape[0]):
            i = int(bulk[first[u]])
            call = calls[int(combo[i])]
            need = route.Need(prompt_tokens=int(prompt_tokens[i]), max_output=int(max_tokens[i]), tier=call.tier)
            put(bulk[order[bounds[u]:bounds[u + 1]]], route.decide(call, targets, (), groups, need))
            out.decide_calls += 1
        if progress:
            progress(int(bulk.size))
    rng = np.random.default_rng(seed)
    draws = rng.random(max(n, 1))
    for i in np.flatnonzero(per_request).tolist():
        call = calls[int(combo[i])]
        need = route.Need(prompt_tokens=int(prompt_tokens[i]), max_output=int(max_tokens[i]), tier=call.tier)
        learned = None
        learner = learners.get(call.requested_model)
        if learner is not None:
            text = prompts[i] if prompts is not None else None
            if text is None:
                out.learned_without_prompt += 1
            else:
                learned = learner.verdict(text, targets, ())
        put(i, route.decide(call, targets, (), groups, need, None, float(draws[i]), learned))
        out.decide_calls += 1
    if progress and per_request.any():
        progress(int(per_request.sum()))
    out.reasons = list(reason_ix)
    out.chains = list(chain_ix)
    return out


class ExactCache:
    """`state.cache.MemoryCache` semantics on the trace's clock: an entry lives `ttl_s` from when it
    was stored; a hit moves it to the back; past `max_entries` the least recently used goes."""

    def __init__(self, max_entries: int, ttl_s: float):
        self.max_entries, self.ttl_s = max_entries, ttl_s
        self._d: OrderedDict[str, tuple[float, Any]] = OrderedDict()

    def get(self, key: str, now: float) -> Any:
        hit = self._d.get(key)
        if hit is None:
            return None
        if hit[0] <= now:
            del self._d[key]
            return None
        self._d.move_to_end(key)
        return hit[1]

    def put(self, key: str, value: Any, now: float) -> None:
        self._d[key] = (now + self.ttl_s, value)
        self._d.move_to_end(key)
        while len(self._d) > self.max_entries:
            self._d.popitem(last=False)


class PrefixCacheSim:
    """A provider's automatic prompt cache, one per served model (providers cache per model and
    organisation). A prompt reuses its longest run of leading blocks still cached; blocks are
    chained hashes (Mooncake), so an equal id means an equal prefix. Each use refreshes a block;
    a block unused for `ttl_s` is gone; beyond `capacity_blocks` the least recently used goes."""

    def __init__(self, s: PrefixCache):
        self.s = s
        self._models: dict[int, OrderedDict[int, float]] = {}

    def use(self, model: int, blocks: np.ndarray, input_tokens: int, now: float) -> int:
        """Cached input tokens for this request; then its blocks are (re)stored."""
        s = self.s
        if not s.enabled or input_tokens < s.min_prompt_tokens or blocks.size == 0:
            return 0
        lru = self._models.setdefault(model, OrderedDict())
        horizon = now - s.ttl_s
        while lru:  # the front is the least recently used: drop what has expired
            k, last = next(iter(lru.items()))
            if last > horizon:
                break
            del lru[k]
        matched = 0
        for b in blocks.tolist():
            if b not in lru:
                break
            matched += 1
        for b in blocks.tolist():
            lru[b] = now
            lru.move_to_end(b)
        while len(lru) > s.capacity_blocks:
            lru.popitem(last=False)
        return min(matched * s.block_tokens, input_tokens)
