"""Policy replay: a trace through the gateway's own policy functions, on the trace's clock.

Order per request, as in gateway/pipeline.py: route (`policy.route.decide`) -> run caps and
budgets (`policy.agents.plan`, `policy.budget.plan`, holds reserved and settled on a `MemoryState`)
-> exact cache (`policy.cache` key, LRU/TTL) -> compression (`policy.compress`) -> provider (prefix
cache from hash_ids) -> price (`ModelRates.cost`, standard or batch lane) -> a cascade step's
verdict, and the next step. Routing is decided once per distinct feature combination; with no
budget, rate limit, run cap, compression or cascade in play the caches run as two sequential
passes and pricing is grouped, so a million requests replay in seconds. Otherwise each request is
replayed in arrival order (flow.py)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from margin.domain import Attribution, Call
from margin.policy import cache as cache_policy
from margin.replay.costing import BATCH, STANDARD
from margin.replay.flow import Flow
from margin.replay.levers import ExactCache, Learner, PrefixCacheSim, factorize, route_all
from margin.replay.outcome import (
    BLOCKED,
    CACHE_HIT,
    DEFERRED,
    RATE_LIMITED,
    REFUSED,
    RUN_STOPPED,
    SERVED,
    Outcome,
    Progress,
    exact_one,
)
from margin.replay.policy import DEFAULT_START, Policy
from margin.replay.traces import Trace

__all__ = ["BLOCKED", "CACHE_HIT", "DEFERRED", "RATE_LIMITED", "REFUSED", "RUN_STOPPED", "SERVED", "Outcome",
           "replay"]


def _column(trace: Trace, name: str, default: str) -> np.ndarray | None:
    col = trace.attr(name)
    if col is None:
        return None
    return np.where(col == "", default, col) if default else col


def _requested(trace: Trace, policy: Policy) -> np.ndarray:
    s = policy.settings
    n = len(trace)
    if s.model is not None:
        return np.full(n, s.model, dtype=object)
    want = trace.attr("requested_model")
    got = trace.attr("model")
    col = want if want is not None else got
    if col is None:
        raise ValueError(f"trace {trace.name!r} records no model: set `replay.model` in {policy.name} "
                         "(a model or group every request asks for)")
    if got is not None and want is not None:
        col = np.where(col == "", got, col)
    known = set(policy.models) | set(policy.groups)
    mapped = np.array([s.model_map.get(m, m) for m in col], dtype=object)
    missing = sorted(set(mapped.tolist()) - known)
    if missing:
        raise ValueError(f"trace {trace.name!r} asks for {missing[:5]}, unknown to {policy.name}: map them with "
                         "`replay.model_map` or set `replay.model`")
    return mapped


def _features(trace: Trace, policy: Policy) -> tuple[list[Call], np.ndarray]:
    """One `Call` per distinct (model asked, attribution, tags, tier, priority), and each request's."""
    s = policy.settings
    n = len(trace)
    a = s.attribution
    cols: dict[str, np.ndarray] = {"requested_model": _requested(trace, policy)}
    for k in ("org", "team", "user", "app", "env", "key_id", "workflow", "priority"):
        c = _column(trace, k, a.get(k, "") if k != "priority" else s.priority)
        if c is not None:
            cols[k] = c
    tier = _column(trace, "tier", s.tier)
    if s.batch_share > 0:  # a seeded share of requests sent as tier batch (deferrable)
        rng = np.random.default_rng(s.seed + 1)
        tier = np.where(rng.random(n) < s.batch_share, "batch", tier if tier is not None else s.tier)
    if tier is not None:
        cols["tier"] = tier.astype(object)
    if trace.tags is not None:
        cols["tags"] = np.array([orjson.dumps(t).decode() for t in trace.tags], dtype=object)
    codes, first = factorize(*cols.values())
    calls = []
    for j in first.tolist():
        v = {k: c[j] for k, c in cols.items()}
        tags = dict(s.tags)
        if "tags" in v:
            tags.update({k: t for k, t in orjson.loads(v["tags"])})
        att = Attribution(v.get("org", a.get("org", "")), v.get("team", a.get("team", "")),
                          v.get("user", a.get("user", "")), v.get("app", a.get("app", "")),
                          v.get("env", a.get("env", "")), v.get("key_id", a.get("key_id", "")),
                          tuple(sorted(tags.items())))
        workflow = v.get("workflow", a.get("workflow", "")) or tags.get("workflow", "")
        calls.append(Call(endpoint="chat", requested_model=v["requested_model"], stream=False, attribution=att,
                          workflow=workflow, tier=v.get("tier", s.tier) or tags.get("tier", ""),
                          priority=v.get("priority", s.priority) or tags.get("priority", "")))
    return calls, codes


def replay(trace: Trace, policy: Policy, progress: Progress | None = None, force_model: str | None = None,
           force_from: str | None = None) -> Outcome:
    """Run ``trace`` through ``policy``. ``force_model`` serves the routed requests with that model
    instead (all of them, or those routed to ``force_from``): a migration, everything else equal."""
    t0 = time.perf_counter()
    s = policy.settings
    n = len(trace)
    models = policy.model_names
    calls, combo = _features(trace, policy)
    max_tokens = (trace.max_tokens.copy() if trace.max_tokens is not None else np.zeros(n, dtype=np.int64))
    if s.max_tokens:
        max_tokens[max_tokens == 0] = s.max_tokens
    asked = {c.requested_model for c in calls}
    learners = {g.name: _learner(g, policy) for g in policy.cfg.groups
                if g.strategy == "learned" and g.router and g.name in asked}
    routed = route_all(calls, combo, trace.input_tokens, max_tokens, models, policy.targets, policy.groups,
                       learners, trace.prompts, s.seed,
                       (lambda k: progress("route", k, n)) if progress else None)
    index = {m: i for i, m in enumerate(models)}
    ref_of_call = np.array([index.get(policy.reference(c.requested_model) or "", -1) for c in calls], dtype=np.int64)
    served = routed.model.copy()
    if force_model is not None:
        served[(served >= 0) if force_from is None else (served == index[force_from])] = index[force_model]
    deferrable = np.array([c.tier == "batch" or c.priority == "low" for c in calls], dtype=bool)
    out = Outcome(
        policy, trace, s.start or trace.start or DEFAULT_START, models, calls, combo, routed,
        ref_of_call[combo] if n else np.zeros(0, dtype=np.int64), served.copy(), served,
        np.where(served >= 0, SERVED, REFUSED).astype(np.int8), np.where(deferrable[combo], BATCH, STANDARD),
        trace.input_tokens, np.zeros(n, dtype=np.int64), trace.output_tokens.copy(), np.zeros(n, dtype=bool),
        np.zeros(n, dtype=bool), compressed=trace.input_tokens.copy(), forced=force_model is not None)
    if trace.cached_input_tokens is not None and trace.hash_ids is None:
        # Recorded provider cache hits stand where the same model serves the request again.
        recorded = trace.attr("model")
        names = recorded.tolist() if recorded is not None else [""] * n
        same = served == np.array([index.get(m, -2) for m in names], dtype=np.int64)
        out.cached = np.where(same, trace.cached_input_tokens, 0)
    keys = _cache_keys(out)
    admit = bool(policy.budgets or policy.rate_limits or (policy.run_caps and _has_runs(trace)))
    if admit or _compresses(out) or _cascades(out):
        asyncio.run(Flow(out, keys, admit).run(progress))
    else:
        _exact_pass(out, keys, progress)
        _prefix_pass(out, progress)
    out.notes += _notes(out, keys is not None, learners)
    out.elapsed_s = time.perf_counter() - t0
    return out


def _has_runs(trace: Trace) -> bool:
    runs = trace.attr("run_id")
    return runs is not None and bool((runs != "").any())


def _compresses(o: Outcome) -> bool:
    """Some request asks for a route that compresses and records messages to compress."""
    asked = {c.requested_model for c in o.calls} & set(o.policy.compression)
    return bool(asked) and o.trace.messages is not None and any(m is not None for m in o.trace.messages)


def _cascades(o: Outcome) -> bool:
    return not o.forced and any(c.requested_model in o.policy.groups and
                                o.policy.groups[c.requested_model].strategy == "cascade" for c in o.calls)


def _learner(g: Any, policy: Policy) -> Learner:
    """A learned group's router; a relative artefact path is looked for beside the policy file too."""
    p = Path(policy.name)
    try:
        return Learner(g.router, g.router_models, p.parent if p.exists() else None)
    except Exception as e:  # ArtefactError, or a pickle that will not load
        raise ValueError(f"{policy.name}: group {g.name!r}: cannot load router {g.router!r}: {e}") from None


def _cache_keys(o: Outcome) -> list[tuple[dict[str, Any], str]] | None:
    """Per request, the payload the exact-cache key covers (minus the model, added once routed)
    and its tenant; None when the cache is off or the trace has nothing to key on."""
    cfg, s, tr = o.policy.cfg.cache, o.policy.settings, o.trace
    if not cfg.enabled:
        return None
    if tr.messages is None and tr.prompts is None and tr.prompt_hash is None and (
            tr.hash_ids is None or not s.exact_cache_on_blocks):
        return None
    n = len(tr)
    temp = tr.temperature if tr.temperature is not None else np.full(n, np.nan)
    tenants = [cache_policy.tenant(c.attribution, cfg.scope) for c in o.calls]
    out: list[tuple[dict[str, Any], str]] = []
    for i in range(n):
        payload: dict[str, Any] = {}
        if tr.messages is not None and tr.messages[i] is not None:
            payload = {"messages": tr.messages[i]}
        elif tr.prompts is not None and tr.prompts[i] is not None:
            payload = {"messages": [{"role": "user", "content": tr.prompts[i]}]}
        elif tr.prompt_hash is not None and tr.prompt_hash[i]:
            payload = {"prompt_sha256": tr.prompt_hash[i]}
        elif tr.hash_ids is not None and s.exact_cache_on_blocks:
            # Token-only trace: equal chained block hashes and equal length stand for one prompt.
            payload = {"hash_ids": tr.hash_ids[i].tolist(), "input_tokens": int(tr.input_tokens[i])}
        if payload:
            t = float(temp[i]) if not np.isnan(temp[i]) else s.temperature
            if t is not None:
                payload["temperature"] = t
        out.append((payload, tenants[int(o.combo[i])]))
    return out if any(p for p, _ in out) else None


def _exact_pass(o: Outcome, keys: list[tuple[dict[str, Any], str]] | None, progress: Progress | None) -> None:
    if keys is None:
        return
    c = o.policy.cfg.cache
    cache = ExactCache(c.max_entries, c.ttl_s)
    rows = np.flatnonzero(o.status == SERVED)
    for done, i in enumerate(rows.tolist(), 1):
        exact_one(o, keys, cache, i, float(o.trace.arrival_s[i]))
        if progress and done % 100_000 == 0:
            progress("exact cache", done, rows.size)


def _prefix_pass(o: Outcome, progress: Progress | None) -> None:
    tr, s = o.trace, o.policy.settings.prefix_cache
    if tr.hash_ids is None or not s.enabled:
        return
    sim = PrefixCacheSim(s)
    rows = np.flatnonzero(o.status == SERVED)
    for i in rows.tolist():
        o.cached[i] = sim.use(int(o.served[i]), tr.hash_ids[i], int(tr.input_tokens[i]), float(tr.arrival_s[i]))
    if progress:
        progress("prefix cache", rows.size, rows.size)


def _notes(o: Outcome, keyed: bool, learners: dict[str, Learner]) -> list[str]:
    pol, tr = o.policy, o.trace
    notes = []
    if pol.compression and tr.messages is None:
        notes.append("compression: not applicable (the trace records no messages; `margin export trace` includes "
                     "them for keys that log payloads)")
    elif o.compression.get("summaries"):
        notes.append("compression summaries: each summariser call is priced at its rates on the estimated tokens "
                     "of its prompt (the dropped turns) and its full summary_max_tokens of output")
    if pol.run_caps and not _has_runs(tr):
        notes.append("run caps: not applicable (no request in the trace carries a run_id)")
    elif pol.run_caps and any(c.max_repeats for c in pol.run_caps) and tr.messages is None and tr.prompts is None:
        notes.append("run caps: max_repeats cannot be checked (the trace records no messages)")
    if o.runs:
        notes.append("run caps: a stopped run's later calls are replayed as recorded (and refused while the cap "
                     "holds); an agent that gave up at the first refusal would not have sent them")
    if pol.cfg.cache.enabled and not keyed:
        notes.append("exact cache: not applicable (the trace records no prompt text, prompt hash or hash_ids)")
    if tr.hash_ids is None:
        notes.append("prefix cache: not simulated (no hash_ids in this trace)")
    if learners and o.routed.learned_without_prompt:
        notes.append(f"learned routing: {o.routed.learned_without_prompt} requests had no prompt text and fell "
                     "back to the group's cheapest fitting model")
    if any(g.strategy == "least-latency" for g in pol.groups.values()):
        notes.append("least-latency groups: replay has no measured latency; the gateway's 'not yet measured' order")
    if o.forced and any(g.strategy == "cascade" for g in pol.groups.values()):
        notes.append("cascade groups: a migration serves every routed request by the candidate, without escalations")
    return notes
