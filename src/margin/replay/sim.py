"""Self-hosted serving simulation: continuous batching on N replicas, discrete-event, iteration by
iteration, every iteration priced by the planner's `step_time_s` (no second performance model).

Scheduler (vLLM V1 style, chunked prefill): each step first gives every decoding sequence one
token; if the KV cache has no room for them, the most recently admitted sequence is preempted
(its KV freed; it is recomputed later from its prompt plus what it generated). The remaining token
budget (`max_batched_tokens`) continues partial prefills, then admits waiting requests in arrival
order while KV has room and fewer than `max_seqs` run. A prefill's last chunk yields the first
token; each decode step one more. Arrivals go to the replica with the fewest requests in it.

Assumptions, stated: KV is counted in tokens (vLLM's 16-token blocks waste < 16 per sequence);
a replica's prefix cache is an LRU of `hash_ids` blocks as large as its KV cache (vLLM keeps freed
blocks until reused), and a sequence's cached prefix still counts in its KV (shared blocks are not
deduplicated, which is pessimistic on capacity)."""

from __future__ import annotations

import heapq
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import numpy as np

from margin.planner.perf import (
    Deployment,
    PlannerError,
    Step,
    busy_fraction,
    kv_capacity_tokens,
    prefill_step,
    replica_power_w,
    step_time_s,
)
from margin.replay.traces import Trace

PREFIX_BLOCK = 512  # Mooncake hash_ids granularity


@dataclass(frozen=True)
class SimConfig:
    replicas: int = 1
    max_batched_tokens: int = 8192  # vLLM's per-step token budget with chunked prefill
    max_seqs: int = 256  # vLLM's max_num_seqs
    prefix_cache: bool = True


@dataclass(slots=True)
class _Seq:
    i: int  # request index in the trace
    arrival: float
    prompt: int  # tokens to prefill (the input, plus generated tokens after a preemption)
    osl: int
    generated: int = 0
    prefilled: int = 0
    first: float = -1.0
    version: int = 0
    enter: int = 0  # the replica's decode-step counter when this sequence started decoding


@dataclass
class _Replica:
    kv_cap: int
    t: float = 0.0
    waiting: deque[_Seq] = field(default_factory=deque)
    prefilling: list[_Seq] = field(default_factory=list)
    decoding: dict[int, _Seq] = field(default_factory=dict)  # admission order (dicts keep it)
    ctx_sum: int = 0  # contexts of the decoding sequences
    kv_used: int = 0
    counter: int = 0  # decode steps done
    finish: list[tuple[int, int, int]] = field(default_factory=list)  # (step, request, version)
    prefix: OrderedDict[int, None] = field(default_factory=OrderedDict)
    busy_s: float = 0.0
    energy_j: float = 0.0
    steps: int = 0
    preemptions: int = 0

    @property
    def load(self) -> int:
        return len(self.waiting) + len(self.prefilling) + len(self.decoding)


@dataclass
class SimResult:
    replicas: int
    requests: int
    completed: int
    rejected: int
    ttft_s: dict[str, float]
    tpot_s: dict[str, float]
    latency_s: dict[str, float]
    gpu_utilisation: float
    preemptions: int
    prefix_hit_share: float
    output_tokens_per_s: float
    energy_j: float
    joules_per_output_token: float
    cost_usd: Decimal
    usd_per_million_output: Decimal | None
    span_s: float
    littles_law: dict[str, float]
    steps: int
    elapsed_s: float
    per_request: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def meets(self, ttft_slo: float | None, tpot_slo: float | None, pct: str = "p99") -> bool:
        return (self.rejected == 0 and (ttft_slo is None or self.ttft_s[pct] <= ttft_slo)
                and (tpot_slo is None or self.tpot_s[pct] <= tpot_slo))

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "per_request"}
        d["cost_usd"] = format(self.cost_usd, "f")
        d["usd_per_million_output"] = (format(self.usd_per_million_output, "f")
                                       if self.usd_per_million_output is not None else None)
        return d


def _pcts(x: np.ndarray) -> dict[str, float]:
    if x.size == 0:
        return {"p50": float("nan"), "p90": float("nan"), "p99": float("nan"), "mean": float("nan")}
    p = np.percentile(x, [50, 90, 99])
    return {"p50": float(p[0]), "p90": float(p[1]), "p99": float(p[2]), "mean": float(x.mean())}


class Simulator:
    def __init__(self, dep: Deployment, cfg: SimConfig):
        if cfg.replicas < 1:
            raise PlannerError(f"replicas must be >= 1, not {cfg.replicas}")
        self.dep, self.cfg = dep, cfg
        self.kv_cap = kv_capacity_tokens(dep)
        self.prefix_blocks = self.kv_cap // PREFIX_BLOCK

    def run(self, trace: Trace) -> SimResult:
        t0 = time.perf_counter()
        n = len(trace)
        reps = [_Replica(self.kv_cap) for _ in range(self.cfg.replicas)]
        self.first_t = np.full(n, np.nan)
        self.done_t = np.full(n, np.nan)
        self.cached_tokens = 0
        self.blocks = trace.hash_ids if self.cfg.prefix_cache else None
        arrivals, inp, out = trace.arrival_s, trace.input_tokens, trace.output_tokens
        seen_in_system = np.zeros(n)
        rejected = np.zeros(n, dtype=bool)
        ctx_limit = min(self.kv_cap, self.dep.model.context)
        for i in range(n):
            ta = float(arrivals[i])
            for r in reps:
                self._advance(r, ta)
            seen_in_system[i] = sum(r.load for r in reps)
            if int(inp[i]) + int(out[i]) > ctx_limit:
                rejected[i] = True  # can never fit one replica: it fails the SLO, it does not hang
                continue
            r = min(reps, key=lambda x: x.load)
            if r.load == 0:
                r.t = max(r.t, ta)
            # An empty prompt or answer (e.g. a cache hit's ledger row) still takes one step.
            r.waiting.append(_Seq(i, ta, max(1, int(inp[i])), max(1, int(out[i]))))
        for r in reps:
            self._advance(r, float("inf"))
        return self._result(trace, reps, rejected, seen_in_system, time.perf_counter() - t0)

    # -- one replica ------------------------------------------------------------------------
    def _advance(self, r: _Replica, until: float) -> None:
        """Run steps while the replica has work and its next step starts before `until`."""
        while r.t < until and r.load:
            self._step(r)

    def _step(self, r: _Replica) -> None:
        cfg, dep = self.cfg, self.dep
        while r.decoding and r.kv_used + len(r.decoding) > r.kv_cap:
            self._preempt(r)
        b = len(r.decoding)
        budget = cfg.max_batched_tokens - b
        chunks: list[tuple[_Seq, int]] = []
        pre_tokens = pre_attn = 0
        for s in r.prefilling:  # partial prefills go first
            if budget <= 0:
                break
            c = min(s.prompt - s.prefilled, budget, r.kv_cap - r.kv_used)
            if c <= 0:
                break
            chunks.append((s, c))
            r.kv_used += c
            budget -= c
        while r.waiting and budget > 0 and b + len(r.prefilling) < cfg.max_seqs:
            s = r.waiting[0]
            fresh = s.prefilled == 0 and s.generated == 0
            if fresh:
                s.prefilled = self._prefix_hit(r, s)
                r.kv_used += s.prefilled
            c = min(s.prompt - s.prefilled, budget, r.kv_cap - r.kv_used)
            if c <= 0:
                if fresh:  # no room after all: the prefix is looked up again when it is admitted
                    r.kv_used -= s.prefilled
                    self.cached_tokens -= s.prefilled if s.version == 0 else 0
                    s.prefilled = 0
                break
            r.waiting.popleft()
            r.prefilling.append(s)
            chunks.append((s, c))
            r.kv_used += c
            budget -= c
        for s, c in chunks:
            st = prefill_step(c, s.prefilled)
            pre_tokens += st.prefill_tokens
            pre_attn += st.prefill_attn
        step = Step(pre_tokens, pre_attn, b, r.ctx_sum)
        dt = step_time_s(dep, step)
        if dt <= 0:  # nothing could run (KV full of partial prefills): preempt to make progress
            self._preempt_prefill(r)
            return
        r.t += dt
        r.busy_s += dt
        r.steps += 1
        r.energy_j += replica_power_w(dep, busy_fraction(dep, step)) * dt
        if b:  # every decoding sequence got one token (its KV slot was taken at step start)
            r.kv_used += b
            r.ctx_sum += b
            r.counter += 1
            while r.finish and r.finish[0][0] <= r.counter:
                _, i, version = heapq.heappop(r.finish)
                d = r.decoding.get(i)
                if d is None or d.version != version:
                    continue
                del r.decoding[i]
                self._done(r, d)
        for s, c in chunks:
            s.prefilled += c
            if s.prefilled < s.prompt:
                continue
            r.prefilling.remove(s)
            self._remember_prefix(r, s)
            s.generated += 1
            if s.first < 0:
                s.first = r.t
                self.first_t[s.i] = r.t
            if s.generated >= s.osl:
                self._done(r, s)
                continue
            s.enter = r.counter
            r.decoding[s.i] = s
            r.ctx_sum += s.prompt
            heapq.heappush(r.finish, (r.counter + s.osl - s.generated, s.i, s.version))

    @staticmethod
    def _kv(r: _Replica, s: _Seq) -> int:
        """KV tokens of a decoding sequence: its prompt plus every generated token but the newest."""
        return s.prompt + s.generated + (r.counter - s.enter) - 1

    def _done(self, r: _Replica, s: _Seq) -> None:
        self.done_t[s.i] = r.t
        if s.generated >= s.osl:  # finished by its prefill: it never decoded
            r.kv_used -= s.prompt
            return
        kv = self._kv(r, s)
        r.ctx_sum -= kv
        r.kv_used -= kv

    def _preempt(self, r: _Replica) -> None:
        """Recompute preemption of the newest decoding sequence (vLLM's default)."""
        i, s = next(reversed(r.decoding.items()))
        del r.decoding[i]
        kv = self._kv(r, s)
        r.ctx_sum -= kv
        r.kv_used -= kv
        r.preemptions += 1
        # Re-prefill the prompt and everything generated so far; that prefill yields the next token.
        g = s.generated + (r.counter - s.enter)
        s.prompt, s.osl = s.prompt + g, s.osl - g
        s.generated, s.prefilled, s.version = 0, 0, s.version + 1
        r.waiting.appendleft(s)

    def _preempt_prefill(self, r: _Replica) -> None:
        if not r.prefilling:
            raise RuntimeError("simulator stalled: nothing to run and nothing to preempt")
        s = r.prefilling.pop()
        r.kv_used -= s.prefilled
        s.prefilled = 0
        s.version += 1
        r.preemptions += 1
        r.waiting.appendleft(s)

    def _prefix_hit(self, r: _Replica, s: _Seq) -> int:
        if self.blocks is None:
            return 0
        hit = 0
        for b in self.blocks[s.i].tolist():
            if b not in r.prefix:
                break
            r.prefix.move_to_end(b)
            hit += PREFIX_BLOCK
        hit = min(hit, s.prompt - 1)  # at least one token is computed, to produce the first output
        if s.version == 0:  # a recomputation after preemption reuses its own blocks: not a new hit
            self.cached_tokens += hit
        return hit

    def _remember_prefix(self, r: _Replica, s: _Seq) -> None:
        if self.blocks is None:
            return
        for b in self.blocks[s.i].tolist():
            r.prefix[b] = None
            r.prefix.move_to_end(b)
        while len(r.prefix) > self.prefix_blocks:
            r.prefix.popitem(last=False)

    # -- results ----------------------------------------------------------------------------
    def _result(self, trace: Trace, reps: list[_Replica], rejected: np.ndarray, seen: np.ndarray,
                elapsed: float) -> SimResult:
        arr, out = trace.arrival_s, trace.output_tokens
        ok = ~rejected & ~np.isnan(self.done_t)
        ttft = self.first_t[ok] - arr[ok]
        lat = self.done_t[ok] - arr[ok]
        multi = ok & (out > 1)
        tpot = (self.done_t[multi] - self.first_t[multi]) / (out[multi] - 1)
        span = float(np.nanmax(self.done_t)) if ok.any() else 0.0
        idle_w = replica_power_w(self.dep, 0.0)
        energy = sum(r.energy_j + idle_w * max(0.0, span - r.busy_s) for r in reps)
        out_tokens = int(out[ok].sum())
        gpus = len(reps) * self.dep.tp
        hours = Decimal(str(round(span, 3))) / Decimal(3600)
        cost = self.dep.gpu.usd_per_hour * gpus * hours
        lam = (len(trace) - 1) / float(arr[-1] - arr[0]) if len(trace) > 1 and arr[-1] > arr[0] else float("nan")
        w = float(lat.mean()) if lat.size else float("nan")
        return SimResult(
            replicas=len(reps), requests=len(trace), completed=int(ok.sum()), rejected=int(rejected.sum()),
            ttft_s=_pcts(ttft), tpot_s=_pcts(tpot), latency_s=_pcts(lat),
            gpu_utilisation=sum(r.busy_s for r in reps) / (len(reps) * span) if span else 0.0,
            preemptions=sum(r.preemptions for r in reps),
            prefix_hit_share=self.cached_tokens / max(1, int(trace.input_tokens[ok].sum())),
            output_tokens_per_s=out_tokens / span if span else 0.0, energy_j=energy,
            joules_per_output_token=energy / out_tokens if out_tokens else float("nan"), cost_usd=cost,
            usd_per_million_output=(cost * 1_000_000 / out_tokens) if out_tokens else None, span_s=span,
            littles_law={"arrival_rate": lam, "mean_time_in_system_s": w, "lambda_w": lam * w,
                         "mean_in_system_seen_by_arrivals": float(seen.mean())},
            steps=sum(r.steps for r in reps), elapsed_s=elapsed,
            per_request={"ttft": ttft, "tpot": tpot, "latency": lat})


@dataclass
class ReplicaSearch:
    replicas: int | None  # the fewest meeting the SLOs (None: none up to the cap)
    tried: dict[int, SimResult]
    lower_bound: int


def find_replicas(trace: Trace, dep: Deployment, cfg: SimConfig, ttft_slo: float | None, tpot_slo: float | None,
                  pct: str = "p99", max_replicas: int = 512) -> ReplicaSearch:
    """The fewest replicas whose simulated `pct` TTFT and TPOT meet the SLOs: start from the
    planner's analytic bound (arrival rate over one replica's SLO-meeting throughput at the trace's
    mean lengths), double until the SLOs hold, then bisect (more replicas never make it worse
    under least-loaded dispatch)."""
    from margin.planner.perf import throughput

    if pct not in ("p50", "p90", "p99"):
        raise PlannerError(f"percentile {pct!r}: use p50, p90 or p99")
    isl = max(1, round(float(trace.input_tokens.mean())))
    osl = max(1, round(float(trace.output_tokens.mean())))
    try:
        per = throughput(dep, min(isl, dep.model.context - osl), osl, ttft_slo=ttft_slo, tpot_slo=tpot_slo,
                         max_batch=cfg.max_seqs).requests_per_s
        bound = max(1, int(np.ceil(trace.rate_per_s / per))) if per > 0 and trace.rate_per_s > 0 else 1
    except PlannerError:
        bound = 1
    tried: dict[int, SimResult] = {}

    def ok(n: int) -> bool:
        if n not in tried:
            tried[n] = Simulator(dep, SimConfig(n, cfg.max_batched_tokens, cfg.max_seqs, cfg.prefix_cache)).run(trace)
        return tried[n].meets(ttft_slo, tpot_slo, pct)

    lo, hi = 0, max(1, bound // 2)
    if not ok(hi) and tried[hi].rejected:
        return ReplicaSearch(None, tried, bound)  # requests no replica can hold: more replicas cannot help
    while not ok(hi):
        lo, hi = hi, hi * 2
        if hi > max_replicas:
            if not ok(max_replicas):
                return ReplicaSearch(None, tried, bound)
            hi = max_replicas
            break
    while hi - lo > 1:  # lo fails (or is 0), hi meets
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return ReplicaSearch(hi, tried, bound)
