"""`POST /v1/outcomes`: validated, stored once (a retry of the same body is not a second outcome),
late outcomes accepted, precise errors; SQLite and PostgreSQL ledgers."""

from __future__ import annotations

import httpx

from tests.conftest import Gateway


def test_outcomes_are_validated_and_idempotent(gateway: Gateway) -> None:
    key = gateway.create_key(team="support")["key"]
    h = {"Authorization": f"Bearer {key}"}
    url = gateway.base_url + "/outcomes"
    body = {"run_id": "case-1", "workflow": "triage", "status": "success", "value_usd": "12.50",
            "human_minutes": 6, "ts": "2026-11-20T10:00:00Z", "metadata": {"ticket": "T-1"}}
    first = httpx.post(url, json=body, headers=h)
    assert first.status_code == 201 and first.json()["created"] is True and first.json()["run_id"] == "case-1"
    again = httpx.post(url, json=body, headers=h)
    assert again.status_code == 200 and again.json() == {**first.json(), "created": False}
    explicit = httpx.post(url, json={"outcome_id": "o-9", "run_id": "case-2", "status": "escalated"}, headers=h)
    assert explicit.status_code == 201 and explicit.json()["id"] == "o-9"
    for bad, fragment in (({"run_id": "x", "status": "done"}, "'status' must be one of"),
                          ({"status": "success"}, "'run_id' is required"),
                          ({"run_id": "x", "status": "success", "value_usd": "lots"}, "'value_usd'"),
                          ({"run_id": "x", "status": "success", "colour": "red"}, "unknown field")):
        r = httpx.post(url, json=bad, headers=h)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_outcome", r.text
        assert fragment in r.json()["error"]["message"]
    assert httpx.post(url, json=body).status_code == 401
    assert httpx.get(url, headers=h).status_code == 405
    assert httpx.post(url, content=b"{oops", headers=h).json()["error"]["code"] == "invalid_json"
