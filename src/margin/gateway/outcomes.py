"""`POST /v1/outcomes`: a client reports how an agent run ended (success, failure, escalated),
possibly long after its calls. Validation is pure (analytics/outcomes.parse_outcome); this shell
authenticates, stores idempotently and answers. Outcomes are written straight to the store (not the
ledger queue): the client learns at once whether it was recorded, and a retry cannot duplicate it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson

from margin.analytics.outcomes import parse_outcome
from margin.gateway.auth import require_caller
from margin.gateway.errors import BadRequest, GatewayError
from margin.gateway.request import parse_json
from margin.ledger.store import StoreUnavailable

if TYPE_CHECKING:
    from margin.gateway.app import MarginApp
    from margin.gateway.pipeline import Headers

JSON: list[tuple[bytes, bytes]] = [(b"content-type", b"application/json")]


class OutcomeStoreUnavailable(GatewayError):
    status, type, code = 503, "api_error", "outcome_store_unavailable"


async def handle(app: MarginApp, headers: dict[str, str], body: bytes) -> tuple[int, Headers, bytes]:
    key = require_caller(await app.keys.authenticate(headers.get("authorization")))
    try:
        row = parse_outcome(parse_json(body))
    except ValueError as e:
        raise BadRequest(f"Invalid outcome: {e}", code="invalid_outcome") from None
    # Who reported it, for audits (the spend is attributed by the run's own calls).
    row["metadata"] = orjson.dumps({**orjson.loads(row["metadata"]), "_reported_by": key.key_id}).decode()
    try:
        created = await app.store.insert_outcome(row)
    except StoreUnavailable:
        raise OutcomeStoreUnavailable("The outcome store is unavailable; retry (the same body is stored once)") \
            from None
    return (201 if created else 200), JSON, orjson.dumps({
        "object": "margin.outcome", "id": row["outcome_id"], "run_id": row["run_id"], "status": row["status"],
        "created": created})
