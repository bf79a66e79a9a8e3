"""Self-hosted pools in the gateway: the periodic autoscaling advice, its Prometheus gauges
(`margin_recommended_replicas{pool}` is what KEDA or an HPA scales on) and `GET /admin/pools`.

Every second the replica gauges are refreshed from the pools' latest scrapes; every pool's
`autoscale.interval_s` its live signals (request rate, lengths, queue, latency at the SLO
percentile over `window_s`) go through planner.autoscale.recommend, and the published figure is
the stabilised one (it falls only after `scale_down_after_s`)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from margin.config import AutoscaleConfig, ConfigError
from margin.gateway.auth import is_admin
from margin.gateway.errors import Forbidden, MethodNotAllowed, Unauthorized
from margin.planner.autoscale import Advice, AutoscaleSpec, PoolSignals, make_spec, recommend, stabilise
from margin.planner.perf import CatalogError, PlannerError
from margin.providers.pool import PoolProvider
from margin.tasks import cancel_and_wait
from margin.telemetry import Telemetry

if TYPE_CHECKING:
    from margin.gateway.app import MarginApp
    from margin.providers.base import Provider

log = logging.getLogger("margin.pools")
TICK_S = 1.0


@dataclass
class _PoolAdvice:
    spec: AutoscaleSpec
    cfg: AutoscaleConfig
    history: list[tuple[float, int]] = field(default_factory=list)
    last: Advice | None = None
    published: int | None = None
    signals: PoolSignals | None = None
    at: float = 0.0  # monotonic time of the last advice


def spec_for(name: str, a: AutoscaleConfig) -> AutoscaleSpec:
    try:
        return make_spec(a.model, a.gpu, a.tp, a.precision, ttft_slo_s=a.ttft_slo_s, tpot_slo_s=a.tpot_slo_s,
                         min_replicas=a.min_replicas, max_replicas=a.max_replicas,
                         target_utilisation=a.target_utilisation, max_batch=a.max_batch,
                         usd_per_replica_hour=a.usd_per_replica_hour, drain_s=a.drain_s, percentile=a.percentile,
                         lead_s=a.startup_s)
    except (CatalogError, PlannerError) as e:
        raise ConfigError(f"provider {name!r}: pool.autoscale: {e}") from None


def signals(pool: PoolProvider, a: AutoscaleConfig, now: float) -> PoolSignals:
    """A live pool's state over the last `a.window_s` seconds (`now` monotonic)."""
    # Before a full window has passed, rates are over the time actually observed.
    started = pool.started_at if pool.started_at is not None else now
    w = max(1e-3, min(a.window_s, now - started)) if now > started else a.window_s
    since = now - w
    arrivals = sum(1 for t in pool.window.arrivals if t >= since)
    def halves(span: float) -> tuple[int, int, float]:
        span = min(span, now - started) if now > started else span
        first = sum(1 for t in pool.window.arrivals if now - span <= t < now - span / 2)
        return first, sum(1 for t in pool.window.arrivals if t >= now - span / 2), span

    served = [s for s in pool.window.served if s.t >= since and s.ok]
    mix = [s for s in pool.window.served if s.t >= now - a.lengths_window_s and s.ok]  # lengths drift slowly
    ins = [s.input_tokens for s in mix if s.input_tokens is not None]
    outs = [s.output_tokens for s in mix if s.output_tokens is not None]
    # Latency of requests sent before a replica (re)joined shows a shortage already answered.
    fresh = [s for s in served if s.t - s.latency_s >= pool.capacity_changed_at]
    ttft = [s.ttft_s for s in fresh if s.ttft_s is not None]
    tpot = [s.tpot_s for s in fresh if s.tpot_s is not None]
    q = float(a.percentile[1:])
    up = [r for r in pool.replicas if r.status == "up" and r.last is not None]
    return PoolSignals(
        window_s=w,
        arrivals=arrivals, trends=(halves(w), halves(a.trend_window_s)),
        replicas=sum(1 for r in pool.replicas if r.status != "down"),
        waiting=float(sum(r.last.waiting or 0.0 for r in up if r.last)),
        running=max(0.0, sum(r.load().load for r in pool.replicas if r.status != "down")
                    - sum(r.last.waiting or 0.0 for r in up if r.last)),
        mean_input_tokens=float(np.mean(ins)) if ins else None,
        mean_output_tokens=float(np.mean(outs)) if outs else None,
        engine_generation_tps=pool.generation_tps(since),
        ttft_s=float(np.percentile(ttft, q)) if ttft else None,
        tpot_s=float(np.percentile(tpot, q)) if tpot else None,
        latency_samples=max(len(ttft), len(tpot)))


class Pools:
    def __init__(self, providers: dict[str, Provider], telemetry: Telemetry):
        self.pools: dict[str, PoolProvider] = {n: p for n, p in providers.items() if isinstance(p, PoolProvider)}
        self.telemetry = telemetry
        self.advice: dict[str, _PoolAdvice] = {}
        for name, p in self.pools.items():
            a = p.cfg.pool.autoscale
            if a is not None:
                self.advice[name] = _PoolAdvice(spec_for(name, a), a)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.pools:
            self.tick(time.monotonic())
            self._task = asyncio.create_task(self._loop(), name="pool-advice")

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            try:
                self.tick(time.monotonic())
            except Exception:  # a bug here must not stop the gauges for good
                log.exception("pool advice failed")

    def tick(self, now: float) -> None:
        t = self.telemetry
        for name, pool in self.pools.items():
            for r in pool.replicas:
                t.pool_replica_load.labels(name, r.name).set(r.load().load)
                t.pool_replica_up.labels(name, r.name).set(0 if r.status == "down" else 1)
            t.pool_queue.labels(name).set(sum([(r.last.waiting or 0.0) for r in pool.replicas
                                               if r.last is not None and r.status == "up"]))
            adv = self.advice.get(name)
            if adv is None or (adv.last is not None and now - adv.at < adv.cfg.interval_s):
                continue
            self.advise(name, pool, adv, now)

    def advise(self, name: str, pool: PoolProvider, adv: _PoolAdvice, now: float) -> Advice:
        adv.signals = s = signals(pool, adv.cfg, now)
        adv.last = a = recommend(s, adv.spec)
        adv.at = now
        adv.history = [(t, n) for t, n in adv.history if t >= now - adv.cfg.scale_down_after_s]
        adv.history.append((now, a.replicas))
        adv.published = stabilise(adv.history, now, adv.cfg.scale_down_after_s)
        self.telemetry.pool_recommended.labels(name).set(adv.published)
        self.telemetry.pool_recommended_cost.labels(name).set(float(adv.spec.usd_per_replica_hour * adv.published))
        return a

    def view(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        out = []
        for name, pool in self.pools.items():
            s = pool.cfg.pool
            entry: dict[str, Any] = {"pool": name, "kind": pool.kind, "strategy": s.strategy, "affinity": s.affinity,
                                     "affinity_slack": s.affinity_slack, "replicas": pool.replica_view(now),
                                     "advice": None}
            adv = self.advice.get(name)
            if adv is not None and adv.last is not None:
                a = adv.spec
                entry["advice"] = {
                    "recommended_replicas": adv.published,
                    "usd_per_hour": format(a.usd_per_replica_hour * (adv.published or 0), "f"),
                    "usd_per_replica_hour": format(a.usd_per_replica_hour, "f"),
                    "raw": adv.last.to_dict(), "age_s": round(now - adv.at, 3),
                    "signals": adv.signals.__dict__ if adv.signals else None,
                    "model": {"model": a.dep.model.id, "gpu": a.dep.gpu.id, "tp": a.dep.tp,
                              "precision": a.dep.precision, "ttft_slo_s": a.ttft_slo_s, "tpot_slo_s": a.tpot_slo_s,
                              "percentile": a.percentile},
                }
            out.append(entry)
        return out


async def handle(app: MarginApp, method: str, headers: dict[str, str]) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """GET /admin/pools: every self-hosted pool, its replicas' load and the autoscaling advice."""
    if not app.cfg.admin_key:
        raise Forbidden("The admin API is disabled: set admin_key in margin.yaml", code="admin_disabled")
    if not is_admin(headers.get("authorization"), app.cfg.admin_key):
        raise Unauthorized("The admin API needs 'Authorization: Bearer <admin_key>'", code="invalid_admin_key")
    if method != "GET":
        raise MethodNotAllowed(f"/admin/pools takes GET, not {method}")
    pools: Pools = app.pools
    return 200, [(b"content-type", b"application/json")], orjson.dumps(
        {"object": "list", "data": pools.view()}, option=orjson.OPT_SERIALIZE_NUMPY)
