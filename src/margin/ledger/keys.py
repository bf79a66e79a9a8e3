"""Virtual keys: minted once, stored only as SHA-256, converted to and from ledger rows."""

from __future__ import annotations

import hashlib
import secrets
from datetime import UTC, datetime

import orjson

from margin.domain import VirtualKey
from margin.ledger.schema import Row

KEY_PREFIX = "mk-"


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_key(
    *, org: str = "", team: str = "", user: str = "", app: str = "", env: str = "", name: str = "",
    models: tuple[str, ...] = (), tags: tuple[tuple[str, str], ...] = (), now: datetime | None = None,
) -> tuple[str, VirtualKey]:
    """Returns (secret, record). The secret is shown once and never stored."""
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    key = VirtualKey(
        key_id="key_" + secrets.token_hex(8), key_hash=hash_secret(secret), prefix=secret[:10],
        created_at=now or datetime.now(UTC), name=name, org=org, team=team, user=user, app=app, env=env,
        models=models, tags=tags,
    )
    return secret, key


def key_to_row(k: VirtualKey) -> Row:
    return {
        "key_id": k.key_id, "key_hash": k.key_hash, "prefix": k.prefix, "name": k.name, "org": k.org,
        "team": k.team, "user": k.user, "app": k.app, "env": k.env, "models": ",".join(k.models),
        "tags": orjson.dumps(dict(k.tags)).decode(), "created_at": k.created_at.isoformat(),
        "revoked_at": k.revoked_at.isoformat() if k.revoked_at else None,
    }


def row_to_key(r: Row) -> VirtualKey:
    tags = orjson.loads(r["tags"]) if r.get("tags") else {}
    return VirtualKey(
        key_id=r["key_id"], key_hash=r["key_hash"], prefix=r["prefix"], name=r.get("name") or "",
        org=r.get("org") or "", team=r.get("team") or "", user=r.get("user") or "", app=r.get("app") or "",
        env=r.get("env") or "", models=tuple(m for m in (r.get("models") or "").split(",") if m),
        tags=tuple(sorted(tags.items())), created_at=datetime.fromisoformat(r["created_at"]),
        revoked_at=datetime.fromisoformat(r["revoked_at"]) if r.get("revoked_at") else None,
    )


def public_view(k: VirtualKey) -> dict[str, object]:
    """What the admin API and CLI show about a key: never the hash."""
    return {
        "key_id": k.key_id, "prefix": k.prefix, "name": k.name, "org": k.org, "team": k.team, "user": k.user,
        "app": k.app, "env": k.env, "models": list(k.models), "tags": dict(k.tags),
        "created_at": k.created_at.isoformat(), "revoked_at": k.revoked_at.isoformat() if k.revoked_at else None,
        "active": k.active,
    }
