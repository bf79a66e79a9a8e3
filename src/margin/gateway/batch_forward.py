"""Batch items for a provider that has its own batch API (`batch_api: true`) go there as one
provider batch, priced at the provider's batch price (pricing/batch.py).

Budgets hold: every item is admitted by the budget guard (worst case reserved, rate limits taken)
before the batch is submitted; an item refused now goes to the per-item lane, which waits as live
traffic would. Each answer becomes a ledger event (lever "batch", the saving against the
real-time price in `actions` and `avoided_cost_usd`) and settles its reservation.

Crash safety: a provider batch is recorded (`preparing`) with its items before it is submitted,
and tagged with that record's id in its metadata, so a replica that takes over a half-submitted
one finds it at the provider instead of submitting it twice. Results are committed only once their
events are in the ledger; a replay after a crash reuses the same event ids."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import orjson

from margin.domain import Attribution, Event, RouteDecision, Usage
from margin.domain.budget import Hold
from margin.gateway import levers
from margin.gateway.batch_files import PATH_OF, new_id
from margin.gateway.batch_worker import EVENT_WAIT_S, error_code, event_id_for, json_text
from margin.gateway.budgets import Admission
from margin.gateway.calls import turns
from margin.gateway.errors import GatewayError
from margin.gateway.request import MAX_TOKENS_FIELD, attribution_for, build_call, parse_tags
from margin.ledger.keys import row_to_key
from margin.ledger.schema import Row
from margin.policy.budget import BudgetPlan
from margin.pricing import PricingError
from margin.pricing.batch import batch_rates
from margin.pricing.prices import ModelRates
from margin.providers.base import UpstreamConnectionError, UpstreamError, UpstreamTimeout
from margin.providers.openai_batch import TERMINAL, BatchClient, results
from margin.providers.usage import parse_usage

if TYPE_CHECKING:
    from margin.gateway.batch_worker import BatchLane

log = logging.getLogger("margin.batch")
MAX_ITEMS = 50_000  # per provider batch (OpenAI's limit)
META_KEY = "margin_upstream_id"
_UPSTREAM_ERRORS = (UpstreamError, UpstreamTimeout, UpstreamConnectionError)


class Forwarder:
    def __init__(self, lane: BatchLane):
        self.lane, self.app, self.jobs = lane, lane.app, lane.jobs
        self.clients = {p.name: BatchClient(p) for p in self.app.cfg.providers if p.batch_api and p.kind == "openai"}
        discount = {p.name: p.batch_discount for p in self.app.cfg.providers}
        self.rates: dict[str, ModelRates] = {}
        for m in self.app.cfg.models:
            if m.provider in self.clients:
                try:
                    self.rates[m.name] = batch_rates(m, discount.get(m.provider))
                except PricingError as e:  # unpriced in batch: served by the per-item lane instead
                    log.warning("batch lane: %s is not forwarded to its provider's batch API: %s", m.name, e)
        self.models = frozenset(self.rates)

    async def close(self) -> None:
        for c in self.clients.values():
            await c.close()

    async def tick(self, now: float) -> None:
        """Submit what waits, poll what was submitted; a provider outage only delays."""
        try:
            await self._submit_due(now)
            await self._poll(now)
        except _UPSTREAM_ERRORS as e:
            log.warning("batch lane: provider batch API failed (%s); retrying later", e)

    # -- submission -------------------------------------------------------------------------------
    async def _submit_due(self, now: float) -> None:
        groups: dict[tuple[str, str], list[str]] = {}
        for r in await self.jobs.forward_due(now):
            provider = self.app.targets[r["model"]].provider if r["model"] in self.app.targets else ""
            if r["model"] in self.models:
                groups.setdefault((r["batch_id"], provider), []).append(r["model"])
        for (batch_id, provider), models in groups.items():
            up = {"upstream_id": new_id("ub_"), "provider": provider, "batch_id": batch_id, "status": "preparing",
                  "provider_batch_id": None, "items": 0, "created_at": now, "next_poll": now + self.lane.cfg.lease_s,
                  "lease_owner": self.lane.owner, "lease_until": now + self.lane.cfg.lease_s}
            items = await self.jobs.open_upstream(up, models, MAX_ITEMS, now)
            if items:
                await self._submit(up, items, now)

    async def _submit(self, up: Row, items: list[Row], now: float) -> None:
        client = self.clients[up["provider"]]
        found = await client.find(META_KEY, up["upstream_id"])  # submitted before a crash: adopt it
        if found is None:
            lines, holds = await self._admit_all(items, now)
            if not lines:
                await self.jobs.set_upstream(up["upstream_id"], {"status": "done"})
                return
            # Holds first: if this replica dies after `create`, whoever adopts the batch settles them.
            await self.jobs.update_items([(i, {"holds": h}) for i, h in holds.items()], "upstream")
            fid = await client.upload(f"{up['upstream_id']}.jsonl", b"\n".join(lines) + b"\n")
            found = await client.create(fid, PATH_OF[items[0]["endpoint"]], "24h",
                                        {META_KEY: up["upstream_id"], "margin_batch_id": up["batch_id"]})
            log.info("batch %s: %d items sent to %s as %s", up["batch_id"], len(lines), up["provider"], found["id"])
        await self.jobs.set_upstream(up["upstream_id"], {
            "status": "submitted", "provider_batch_id": str(found["id"]), "lease_owner": None, "lease_until": None,
            "next_poll": now + self.lane.cfg.provider_poll_s})

    async def _admit_all(self, items: list[Row], now: float) -> tuple[list[bytes], dict[str, str]]:
        """Reserve each item's worst case on its budgets; the admitted ones as upstream JSONL lines."""
        lines: list[bytes] = []
        holds: dict[str, str] = {}
        back: list[tuple[str, Row]] = []
        for it in items:
            admitted = await self._admit(it)
            if admitted is None:
                back.append((it["item_id"], {"status": "queued", "upstream_id": None, "not_before": now}))
                continue
            line, hold = admitted
            lines.append(line)
            if hold is not None:
                holds[it["item_id"]] = hold
        await self.jobs.update_items(back, "upstream")
        return lines, holds

    async def _admit(self, it: Row) -> tuple[bytes, str | None] | None:
        key_row = await self.app.store.key_by_id(it["key_id"])
        key = row_to_key(key_row) if key_row else None
        if key is None or not key.active:
            return None  # the per-item lane answers it (401, recorded)
        payload = orjson.loads(it["body"])
        headers: dict[str, str] = orjson.loads(it["headers"])
        t = self.app.targets[it["model"]]
        decision = RouteDecision(t.model, t.provider, t.upstream_model, "provider batch API")
        scratch = Event(event_id="", ts_start=datetime.now(UTC), ts_end=datetime.now(UTC), request_id="",
                        endpoint=it["endpoint"], attribution=key.attribution(), requested_model=it["model"])
        try:
            call = build_call(it["endpoint"], payload, headers, key)
            # Held until the item's window ends (a provider batch may take up to 24 h), plus an hour.
            adm = await self.app.guard.admit(call, decision, len(it["body"]), turns(it["endpoint"], payload),
                                             scratch, ttl_s=max(0.0, float(it["expires_at"]) - time.time()) + 3600)
        except GatewayError:
            return None  # refused now (budget, rate limit): the per-item lane waits and records it
        model = adm.plan.model if adm is not None else t.model
        if model not in self.models or self.app.targets[model].provider != t.provider:
            if adm is not None:  # downgraded to a model this provider batch cannot carry
                await self.app.guard.settle(adm, scratch)
            return None
        if adm is not None and adm.plan.max_tokens is not None:
            payload[MAX_TOKENS_FIELD.get(it["endpoint"], "max_tokens")] = adm.plan.max_tokens
        payload["model"] = self.app.targets[model].upstream_model
        line = orjson.dumps({"custom_id": it["item_id"], "method": "POST", "url": PATH_OF[it["endpoint"]],
                             "body": payload})
        hold = None if adm is None else orjson.dumps({"rid": adm.rid, "model": model, "holds": [
            dataclasses.asdict(h) for h in adm.plan.holds]}).decode()
        return line, hold

    # -- results ----------------------------------------------------------------------------------
    async def _poll(self, now: float) -> None:
        for up in await self.jobs.claim_upstreams(self.lane.owner, now, now + self.lane.cfg.lease_s):
            if up["status"] == "preparing":  # its replica died while submitting
                items = await self.jobs.upstream_items(up["upstream_id"])
                await self._submit(up, items, now)
                continue
            client = self.clients.get(up["provider"])
            if client is None:
                continue
            remote = await client.retrieve(up["provider_batch_id"])
            batch = await self.jobs.get_batch(up["batch_id"])
            if batch is not None and batch["status"] == "cancelling" and remote.get("status") in (
                    "validating", "in_progress"):
                remote = await client.cancel(up["provider_batch_id"])
            if remote.get("status") not in TERMINAL:
                await self.jobs.set_upstream(up["upstream_id"], {"next_poll": now + self.lane.cfg.provider_poll_s,
                                                                 "lease_owner": None, "lease_until": None})
                continue
            files = [await client.content(str(remote[f])) for f in ("output_file_id", "error_file_id")
                     if remote.get(f)]
            await self._record(up, results(*files), batch is not None and batch["status"] == "cancelling")

    async def _record(self, up: Row, answers: dict[str, tuple[int, bytes]], cancelling: bool) -> None:
        items = await self.jobs.upstream_items(up["upstream_id"])
        updates: list[tuple[str, Row]] = []
        waiting: set[str] = set()
        now = time.time()
        for it in items:
            ans = answers.get(it["item_id"])
            if ans is None or ans[0] == 0:  # not answered upstream: cancelled, or the per-item lane runs it
                await self._settle(it, None)
                updates.append((it["item_id"], {"status": "cancelled", "finished_at": now, "error_code":
                                                "batch_cancelled"} if cancelling else
                                {"status": "queued", "upstream_id": None, "not_before": now}))
                continue
            status, body = ans
            ev = await self._event(it, up, status, body, now)
            self.app.writer.append(ev)
            self.app.telemetry.observe(ev)
            await self._settle(it, ev)
            waiting.add(ev.event_id)
            outcome = "done" if 200 <= status < 300 else "failed"
            updates.append((it["item_id"], {
                "status": outcome, "runs": int(it["runs"]) + 1, "attempts": int(it["attempts"]) + 1,
                "response_status": status, "response_body": json_text(body), "response_request_id": it["request_id"],
                "event_id": ev.event_id, "cost_usd": ev.cost.total_usd, "saved_usd": ev.avoided_cost_usd,
                "error_code": error_code(body)[0] or None, "finished_at": now, "holds": None}))
        deadline = time.monotonic() + EVENT_WAIT_S  # commit once the events are in the ledger
        while waiting and time.monotonic() < deadline:
            waiting -= await self.jobs.events_present(list(waiting))
            if waiting:
                await asyncio.sleep(0.05)
        await self.jobs.update_items(updates, "upstream")
        await self.jobs.set_upstream(up["upstream_id"], {"status": "done", "lease_owner": None, "lease_until": None})

    async def _settle(self, it: Row, ev: Event | None) -> None:
        if not it.get("holds"):
            return
        h = orjson.loads(it["holds"])
        plan = BudgetPlan(model=h["model"], holds=[Hold(**x) for x in h["holds"]])
        zero = Event(event_id="", ts_start=datetime.now(UTC), ts_end=datetime.now(UTC), request_id="", endpoint="",
                     attribution=Attribution(), requested_model="")
        # A reservation lost with a restart (or lapsed) settles as plain spend: counters stay right.
        await self.app.guard.settle(Admission(h["rid"], plan, self.app.guard.state), ev or zero)

    async def _event(self, it: Row, up: Row, status: int, body: bytes, now: float) -> Event:
        """The item's ledger event, priced at the batch rate, with the saving against real time."""
        key_row = await self.app.store.key_by_id(it["key_id"])
        headers: dict[str, str] = orjson.loads(it["headers"])
        hold = orjson.loads(it["holds"]) if it.get("holds") else {}
        model = str(hold.get("model") or it["model"])
        attribution = (attribution_for(row_to_key(key_row), parse_tags(headers.get("x-margin-tags")))
                       if key_row else Attribution())
        data = orjson.loads(body) if body else {}
        usage = (parse_usage(data) if isinstance(data, dict) else None) or Usage()
        rates = self.rates.get(model) or self.rates[it["model"]]
        ev = Event(event_id=event_id_for(it["item_id"], int(it["runs"])),
                   ts_start=datetime.fromtimestamp(float(up["created_at"]), UTC),
                   ts_end=datetime.fromtimestamp(now, UTC),
                   request_id=it["request_id"], endpoint=it["endpoint"], attribution=attribution,
                   requested_model=it["model"], model=model, provider=up["provider"], tier="batch",
                   route_reason=f"provider batch API ({up.get('provider_batch_id')})",
                   run_id=headers.get("x-margin-run-id", ""), workflow=headers.get("x-margin-workflow") or
                   attribution.tag_map.get("workflow", ""), usage=usage, cost=rates.cost(usage), status=status,
                   latency_ms=round((now - float(up["created_at"])) * 1000, 3))
        if status >= 400:
            ev.error_type = error_code(body)[0] or "upstream_error"
        else:
            levers.saved(ev, "batch", self.app.prices.cost(model, usage).total_usd - ev.cost.total_usd)
        ev.energy_j = self.app.prices.energy(model, usage)
        return ev

