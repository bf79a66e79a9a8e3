"""`/admin/*`: key management over HTTP, guarded by the admin key from margin.yaml."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson

from margin.gateway import audit, budget_admin
from margin.gateway.auth import is_admin
from margin.gateway.errors import BadRequest, Forbidden, MethodNotAllowed, NotFound, Unauthorized
from margin.gateway.pipeline import JSON_HEADERS, Headers
from margin.gateway.request import parse_json
from margin.ledger.keys import key_to_row, new_key, public_view, row_to_key

if TYPE_CHECKING:
    from margin.gateway.app import MarginApp

_KEY_FIELDS = ("org", "team", "user", "app", "env", "name")


def _json(status: int, obj: Any) -> tuple[int, Headers, bytes]:
    return status, JSON_HEADERS, orjson.dumps(obj)


def key_spec(body: dict[str, Any], partial: bool = False) -> dict[str, Any]:
    """Validate a key body: string attribution fields, a list of models, a tag map. `partial`
    (PATCH) keeps only the fields given."""
    unknown = set(body) - {*_KEY_FIELDS, "models", "tags"}
    if unknown:
        raise BadRequest(f"Unknown field(s) for a key: {', '.join(sorted(unknown))}", code="invalid_value")
    spec: dict[str, Any] = {}
    for f in _KEY_FIELDS:
        if partial and f not in body:
            continue
        v = body.get(f, "")
        if not isinstance(v, str):
            raise BadRequest(f"'{f}' must be a string", param=f, code="invalid_type")
        spec[f] = v
    if spec.get("env") and spec["env"] not in ("prod", "dev", "staging", "test"):
        raise BadRequest("'env' must be one of prod, dev, staging, test", param="env", code="invalid_value")
    models = body.get("models") or []
    if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
        raise BadRequest("'models' must be a list of model names", param="models", code="invalid_type")
    tags = body.get("tags") or {}
    if not isinstance(tags, dict) or not all(isinstance(v, str) for v in tags.values()):
        raise BadRequest("'tags' must be an object of string values", param="tags", code="invalid_type")
    if not partial or "models" in body:
        spec["models"] = tuple(models)
    if not partial or "tags" in body:
        spec["tags"] = tuple(sorted(tags.items()))
    return spec


def _check_models(app: MarginApp, spec: dict[str, Any]) -> None:
    unknown = [m for m in spec.get("models", ()) if m not in app.targets]
    if unknown:
        raise BadRequest(f"Unknown model(s): {', '.join(unknown)}", param="models", code="model_not_found")


async def handle(app: MarginApp, method: str, path: str, headers: dict[str, str],
                 body: bytes, scope: dict[str, Any] | None = None) -> tuple[int, Headers, bytes]:
    if not app.cfg.admin_key:
        raise Forbidden("The admin API is disabled: set admin_key in margin.yaml", code="admin_disabled")
    if not is_admin(headers.get("authorization"), app.cfg.admin_key):
        raise Unauthorized("The admin API needs 'Authorization: Bearer <admin_key>'", code="invalid_admin_key")
    parts = path.strip("/").split("/")  # ["admin", "keys" | "budgets", id?]
    who = audit.who(scope)  # audit (issue 11): the actor and client address of the changes below
    if len(parts) in (2, 3) and parts[1].partition("?")[0] == "audit":
        return await audit.handle(app, method, path, scope)
    if len(parts) in (2, 3) and parts[1] == "runs":  # agent runs and their caps (issue 6)
        from margin.gateway import runs_admin

        query = (scope or {}).get("query_string", b"").decode("latin-1")
        return await runs_admin.handle(app, method, parts, query)
    if len(parts) == 2 and parts[1] == "pools":  # self-hosted pools and autoscaling advice (issue 11)
        from margin.gateway import pools

        return await pools.handle(app, method, headers)
    if len(parts) in (2, 3) and parts[1] == "budgets":
        return await budget_admin.handle(app, method, parts, body, who)
    if len(parts) < 2 or parts[1] != "keys" or len(parts) > 3:
        raise NotFound(f"Unknown admin path {path}", code="unknown_url")
    key_id = parts[2] if len(parts) == 3 else None
    if key_id is None:
        if method == "GET":
            return _json(200, {"object": "list", "data": [public_view(row_to_key(r))
                                                          for r in await app.store.list_keys()]})
        if method == "POST":
            spec = key_spec(parse_json(body) if body else {})
            _check_models(app, spec)
            secret, key = new_key(**spec)
            await app.store.insert_key(key_to_row(key))
            await audit.record(app, who, "key.create", key.key_id, None, public_view(key))  # audit: never the secret
            return _json(201, {"key": secret, **public_view(key)})
        raise MethodNotAllowed(f"{path} takes GET or POST")
    row = await app.store.key_by_id(key_id)
    if row is None:
        raise NotFound(f"No key with id {key_id}", code="key_not_found")
    if method == "GET":
        return _json(200, public_view(row_to_key(row)))
    if method == "DELETE":
        await app.store.revoke_key(key_id, datetime.now(UTC))
    elif method == "PATCH":
        spec = key_spec(parse_json(body), partial=True)
        _check_models(app, spec)
        current = row_to_key(row)
        updated = dataclasses.replace(current, **spec)
        fields = {k: v for k, v in key_to_row(updated).items() if k in spec}
        if fields:
            await app.store.update_key(key_id, fields)
    else:
        raise MethodNotAllowed(f"{path} takes GET, PATCH or DELETE")
    app.keys.forget(key_id)
    fresh = await app.store.key_by_id(key_id)
    assert fresh is not None
    # audit (issue 11): public views only (never the key's hash); nothing is recorded if nothing changed
    await audit.record(app, who, "key.revoke" if method == "DELETE" else "key.update", key_id,
                       public_view(row_to_key(row)), public_view(row_to_key(fresh)))
    return _json(200, public_view(row_to_key(fresh)))
