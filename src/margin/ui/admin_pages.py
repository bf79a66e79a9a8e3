"""Admin-only pages that show the gateway's own state rather than the ledger's figures: the audit
log (issue 11: "viewable in the dashboard") and the self-hosted pools with their autoscaling
advice. Both read the admin API in-process, exactly what `GET /admin/audit`, `GET /admin/audit/verify`
and `GET /admin/pools` answer; a team viewer gets 403."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

import orjson

from margin.ledger.audit import MAX_SEQ
from margin.ui.core import Dashboard, Problem, Reply, Request
from margin.ui.session import Session

AUDIT_PAGE = 50
AUDIT_FILTERS = ("target", "action", "actor")
AUDIT_SINCE = {"": "any time", "24h": "last 24 hours", "7d": "last 7 days", "30d": "last 30 days",
               "90d": "last 90 days"}
AUDIT_ACTIONS = ("key.*", "key.create", "key.update", "key.revoke", "budget.*", "budget.create", "budget.update",
                 "budget.delete", "config.*", "config.initial", "config.changed", "config.unchanged")
MAX_CHANGES = 12


def _admin_only(s: Session, what: str) -> None:
    if not s.is_admin:
        raise Problem(403, f"Only an admin can see {what}")


def _short(v: Any, width: int = 80) -> str:
    text = v if isinstance(v, str) else orjson.dumps(v, option=orjson.OPT_SORT_KEYS).decode()
    return text if len(text) <= width else text[: width - 1] + "…"


def changes(action: str, before: Any, after: Any) -> list[str]:
    """What a record changed, one line per field, for people (the page also shows the full JSON)."""
    if action == "config.unchanged" and isinstance(after, dict):
        return [f"same configuration as record #{after.get('same_as_seq')}"]
    if action == "config.initial" and isinstance(after, dict):
        return [f"first configuration recorded (sha256 {str(after.get('hash', ''))[:12]}…)"]
    if action == "config.changed" and isinstance(after, dict):
        old = (before or {}).get("changed") or {}
        new = after.get("changed") or {}
        lines = [f"{p}: {_short(old.get(p, '(absent)'), 40)} → {_short(new.get(p, '(absent)'), 40)}"
                 for p in sorted(old.keys() | new.keys())]
    elif before is None and isinstance(after, dict):
        lines = [f"{k}: {_short(v)}" for k, v in after.items() if v not in (None, "", [], {})]
    elif after is None and isinstance(before, dict):
        lines = ["deleted", *(f"{k} was {_short(v)}" for k, v in before.items() if v not in (None, "", [], {}))]
    elif isinstance(before, dict) and isinstance(after, dict):
        lines = [f"{k}: {_short(before.get(k, '(absent)'), 40)} → {_short(after.get(k, '(absent)'), 40)}"
                 for k in sorted(before.keys() | after.keys()) if before.get(k) != after.get(k)]
    else:
        lines = [f"{_short(before)} → {_short(after)}"]
    if len(lines) > MAX_CHANGES:
        lines = [*lines[:MAX_CHANGES], f"… and {len(lines) - MAX_CHANGES} more (see the full record)"]
    return lines


def _pretty(v: Any) -> str:
    text = orjson.dumps(v, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode()
    return text if len(text) <= 20_000 else text[:20_000] + "\n… (cut: margin audit export has it all)"


async def audit(d: Dashboard, req: Request, s: Session, form: dict[str, str] | None) -> Reply:
    """Audit records, newest first, filtered by target / action / actor / age, 50 a page, under the
    verdict of the hash chain."""
    _admin_only(s, "the audit log")
    q = {k: req.query.get(k, "").strip() for k in AUDIT_FILTERS}
    for k, v in q.items():
        if len(v) > 200:
            raise Problem(400, f"'{k}' is longer than 200 characters")
    since, before, limit = req.query.get("since", ""), req.query.get("before_seq", ""), req.query.get("limit", "")
    if since not in AUDIT_SINCE:
        raise Problem(400, f"since {since!r}: choose one of {', '.join(k for k in AUDIT_SINCE if k)} (or none)")
    if before and not (before.isascii() and before.isdigit() and int(before) <= MAX_SEQ):
        raise Problem(400, f"before_seq {before!r} must be a record number")
    if limit and not (limit.isascii() and limit.isdigit() and 1 <= int(limit) <= 500):
        raise Problem(400, f"limit {limit!r} must be a number from 1 to 500")
    ask = {**{k: v for k, v in q.items() if v}, **({"since": since} if since else {})}
    status, body = await d.admin.call("GET", "/admin/audit?" + urlencode(
        {**ask, **({"before_seq": before} if before else {}), "limit": limit or str(AUDIT_PAGE)}))
    if status != 200:
        raise Problem(status, f"The audit log is unavailable: {body.get('error', f'HTTP {status}')}")
    v_status, verdict = await d.admin.call("GET", "/admin/audit/verify")
    records = [{**r, "changes": changes(r["action"], r["before"], r["after"]),
                "before_json": _pretty(r["before"]) if r["before"] is not None else "",
                "after_json": _pretty(r["after"]) if r["after"] is not None else ""} for r in body["data"]]
    keep = {**ask, **({"limit": limit} if limit else {})}
    older = (f"/ui/audit?{urlencode({**keep, 'before_seq': records[-1]['seq']})}"
             if body.get("has_more") and records else "")
    return d.html(req, "audit.html", d.ctx(
        req, s, "audit", None, records=records, head=body.get("head") or {}, q=q, since=since,
        since_choices=AUDIT_SINCE, actions=AUDIT_ACTIONS, verdict=verdict if v_status == 200 else None,
        verify_error="" if v_status == 200 else verdict.get("error", f"HTTP {v_status}"), older=older,
        newest=f"/ui/audit?{urlencode(keep)}" if before else "", filtered=bool(ask)))


async def pools_view(d: Dashboard) -> list[dict[str, Any]] | None:
    """What `GET /admin/pools` answers, or None when the gateway has no pools."""
    status, body = await d.admin.call("GET", "/admin/pools")
    if status == 200:
        data: list[dict[str, Any]] = body["data"]
        return data
    # The gateway answers /admin/pools itself, outside the admin handler the dashboard is given:
    # read the same view from it, as JSON (numbers from numpy become plain numbers).
    pools = getattr(d.host, "pools", None)
    if pools is None or not hasattr(pools, "view"):
        return None
    out: list[dict[str, Any]] = orjson.loads(orjson.dumps(pools.view(), option=orjson.OPT_SERIALIZE_NUMPY))
    return out


def _pool_rows(pools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for p in pools:
        adv = p.get("advice") or None
        current = sum(1 for r in p.get("replicas", []) if r.get("status") != "down")
        extra: dict[str, Any] = {"current": current}
        if adv:
            per = adv.get("usd_per_replica_hour")
            extra["current_usd_per_hour"] = f"{float(per) * current:.2f}" if per is not None else None
            extra["change"] = (adv.get("recommended_replicas") or 0) - current
        out.append({**p, **extra})
    return out


async def pools(d: Dashboard, req: Request, s: Session, form: dict[str, str] | None) -> Reply:
    """Self-hosted pools: each replica's load and state, and the autoscaling advice with its cost."""
    _admin_only(s, "the self-hosted pools")
    view = await pools_view(d)
    return d.html(req, "pools.html", d.ctx(req, s, "pools", None, pools=_pool_rows(view or [])))
