"""The OpenAPI 3.0 document of the gateway (`GET /openapi.json`): the OpenAI-compatible /v1 surface
and the /admin API, as margin implements them. Written by hand (the gateway has no framework to
derive it from) and kept loose where OpenAI's own schema is (extra fields are passed upstream).
schemathesis fuzzes the running gateway against it (tests/test_fuzz.py)."""

from __future__ import annotations

import functools
from typing import Any

import orjson

from margin import __version__

_S = "#/components/schemas/"
_R = "#/components/responses/"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _S + name}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(c): {"$ref": _R + "Error"} for c in codes}


def _op(summary: str, ok: dict[str, Any], *, body: str | None = None, codes: tuple[int, ...] = (),
        admin: bool = False, security: bool = True, params: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": {**ok, **_errors(*codes)}}
    if body:
        op["requestBody"] = {"required": True, "content": _json(_ref(body))}
    if security:
        op["security"] = [{"adminKey": []}] if admin else [{"virtualKey": []}]
    else:
        op["security"] = []
    if params:
        op["parameters"] = params
    return op


_MARGIN_HEADERS = [
    {"name": "X-Margin-Tags", "in": "header", "required": False,
     "description": "key=value pairs, comma-separated (at most 20)", "schema": {"type": "string"}},
    {"name": "X-Margin-Run-Id", "in": "header", "required": False, "schema": {"type": "string", "maxLength": 256}},
    {"name": "X-Margin-Tier", "in": "header", "required": False,
     "schema": {"type": "string", "enum": ["premium", "standard", "batch"]}},
    {"name": "X-Request-Id", "in": "header", "required": False, "schema": {"type": "string", "maxLength": 256}},
]
_V1_ERRORS = (400, 401, 403, 404, 413, 429, 502, 503, 504)
_ADMIN_ERRORS = (400, 401, 403, 404, 405)

_CONTENT = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}], "nullable": True}
_MAX = {"type": "integer", "minimum": 1}

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object", "required": ["error"],
        "properties": {"error": {"type": "object", "required": ["message", "type"], "properties": {
            "message": {"type": "string"}, "type": {"type": "string"},
            "param": {"type": "string", "nullable": True}, "code": {"type": "string", "nullable": True}}}},
    },
    "Message": {
        "type": "object", "required": ["role"],
        "properties": {"role": {"type": "string"}, "content": _CONTENT, "name": {"type": "string"}},
    },
    "ChatRequest": {
        "type": "object", "required": ["model", "messages"],
        "properties": {
            "model": {"type": "string", "minLength": 1}, "messages": {"type": "array", "minItems": 1,
                                                                      "items": _ref("Message")},
            "max_tokens": _MAX, "max_completion_tokens": _MAX, "stream": {"type": "boolean"},
            "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
            "temperature": {"type": "number", "minimum": 0, "maximum": 2},
            "tools": {"type": "array", "items": {"type": "object"}}, "user": {"type": "string"},
        },
    },
    "CompletionRequest": {
        "type": "object", "required": ["model", "prompt"],
        "properties": {"model": {"type": "string", "minLength": 1},
                       "prompt": {"oneOf": [{"type": "string"}, {"type": "array", "minItems": 1}]},
                       "max_tokens": _MAX, "stream": {"type": "boolean"}},
    },
    "EmbeddingRequest": {
        "type": "object", "required": ["model", "input"],
        "properties": {"model": {"type": "string", "minLength": 1},
                       "input": {"oneOf": [{"type": "string"}, {"type": "array", "minItems": 1}]},
                       "encoding_format": {"type": "string", "enum": ["float", "base64"]}},
    },
    "ResponseRequest": {
        "type": "object", "required": ["model", "input"],
        "properties": {"model": {"type": "string", "minLength": 1},
                       "input": {"oneOf": [{"type": "string"}, {"type": "array", "minItems": 1,
                                                                 "items": {"type": "object"}}]},
                       "instructions": {"type": "string"}, "max_output_tokens": _MAX, "stream": {"type": "boolean"},
                       "tools": {"type": "array", "items": {"type": "object"}},
                       "previous_response_id": {"type": "string"}},
    },
    "Completion": {"type": "object", "description": "OpenAI-shaped answer (chat.completion, text_completion, "
                   "list of embeddings, response), or an SSE stream when stream is true"},
    "ModelList": {"type": "object", "required": ["object", "data"],
                  "properties": {"object": {"type": "string"}, "data": {"type": "array", "items": {
                      "type": "object", "properties": {"id": {"type": "string"}, "owned_by": {"type": "string"}}}}}},
    "KeySpec": {
        "type": "object", "additionalProperties": False,
        "properties": {
            **{f: {"type": "string"} for f in ("org", "team", "user", "app", "name")},
            "env": {"type": "string", "enum": ["", "prod", "dev", "staging", "test"]},
            "models": {"type": "array", "items": {"type": "string", "minLength": 1}},
            "tags": {"type": "object", "additionalProperties": {"type": "string"},
                     "description": "default tags; log_payloads, max_tokens, max_messages are policy"},
        },
    },
    "Key": {"type": "object", "required": ["key_id", "prefix", "active"],
            "properties": {"key_id": {"type": "string"}, "prefix": {"type": "string"}, "active": {"type": "boolean"},
                           "key": {"type": "string", "description": "the secret, only when created"}}},
    "KeyList": {"type": "object", "properties": {"object": {"type": "string"},
                                                  "data": {"type": "array", "items": _ref("Key")}}},
    "Budget": {
        "type": "object", "required": ["id"], "additionalProperties": False,
        "oneOf": [{"required": ["limit_usd"]}, {"required": ["limit_tokens"]}],
        "properties": {"id": {"type": "string", "pattern": "^[A-Za-z0-9_.\\-]+$"}, "name": {"type": "string"},
                       "scope": {"type": "object", "additionalProperties": {"type": "string"}},
                       "limit_usd": {"type": "number", "exclusiveMinimum": True, "minimum": 0},
                       "limit_tokens": {"type": "integer", "minimum": 1},
                       "period": {"type": "string", "enum": ["day", "week", "month", "custom", "rolling"]},
                       "timezone": {"type": "string"}, "thresholds": {"type": "array", "items": {"type": "object"}}},
    },
    "BudgetStatus": {"type": "object", "properties": {"id": {"type": "string"},
                                                      "counters": {"type": "array", "items": {"type": "object"}}}},
    "BudgetList": {"type": "object", "properties": {"data": {"type": "array", "items": _ref("BudgetStatus")}}},
    "RunList": {"type": "object", "properties": {"object": {"type": "string"}, "since": {"type": "string"},
                                                  "data": {"type": "array", "items": {"type": "object"}}}},
    "Run": {"type": "object", "properties": {"run_id": {"type": "string"}, "calls": {"type": "integer"},
                                              "cost_usd": {"type": "string"}, "steps": {"type": "array"},
                                              "caps": {"type": "array"}}},
    "Pools": {"type": "object", "properties": {"object": {"type": "string"},
                                                "data": {"type": "array", "items": {"type": "object"}}}},
    "AuditList": {"type": "object", "properties": {"object": {"type": "string"}, "has_more": {"type": "boolean"},
                                                    "data": {"type": "array", "items": {"type": "object"}},
                                                    "head": {"type": "object"}}},
    "AuditVerify": {"type": "object", "properties": {"ok": {"type": "boolean"}, "records": {"type": "integer"},
                                                      "bad_seq": {"type": "integer", "nullable": True},
                                                      "reason": {"type": "string", "nullable": True}}},
    "OutcomeReport": {"type": "object", "required": ["run_id", "status"],
                      "properties": {"run_id": {"type": "string", "minLength": 1}, "status": {"type": "string"},
                                     "workflow": {"type": "string"}, "value_usd": {"type": "number"},
                                     "quality": {"type": "number"}, "human_minutes": {"type": "number"},
                                     "metadata": {"type": "object"}}},
    "Outcome": {"type": "object", "properties": {"id": {"type": "string"}, "run_id": {"type": "string"}}},
    "Health": {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}},
}

_KEY_ID = [{"name": "key_id", "in": "path", "required": True, "schema": {"type": "string"}}]
_BUDGET_ID = [{"name": "budget_id", "in": "path", "required": True, "schema": {"type": "string"}}]
_RUN_ID = [{"name": "run_id", "in": "path", "required": True, "schema": {"type": "string"}}]
_RUNS_QUERY = [{"name": "since", "in": "query", "schema": {"type": "string"}},
               {"name": "workflow", "in": "query", "schema": {"type": "string"}},
               {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}}]
_AUDIT_QUERY = [{"name": n, "in": "query", "schema": {"type": "string"}}
                for n in ("since", "target", "action", "actor")] + [
    {"name": "before_seq", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 2**63 - 1}},
    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}}]


def _ok(schema: str, status: int = 200, sse: bool = False) -> dict[str, Any]:
    content = _json(_ref(schema))
    if sse:
        content["text/event-stream"] = {"schema": {"type": "string"}}
    return {str(status): {"description": "OK", "content": content}}


def document() -> dict[str, Any]:
    v1 = {
        "/v1/chat/completions": {"post": _op("Chat completion (streaming with stream: true)",
                                             _ok("Completion", sse=True), body="ChatRequest", codes=_V1_ERRORS,
                                             params=_MARGIN_HEADERS)},
        "/v1/completions": {"post": _op("Legacy completion", _ok("Completion", sse=True), body="CompletionRequest",
                                        codes=_V1_ERRORS, params=_MARGIN_HEADERS)},
        "/v1/embeddings": {"post": _op("Embeddings", _ok("Completion"), body="EmbeddingRequest", codes=_V1_ERRORS,
                                       params=_MARGIN_HEADERS)},
        "/v1/responses": {"post": _op("Responses API (streaming with stream: true; named events, no [DONE])",
                                      _ok("Completion", sse=True), body="ResponseRequest", codes=_V1_ERRORS,
                                      params=_MARGIN_HEADERS)},
        "/v1/models": {"get": _op("Models this key may use", _ok("ModelList"), codes=(401, 503))},
        "/v1/outcomes": {"post": _op("Report the outcome of a run (joins the ledger on run_id)",
                                     {**_ok("Outcome", 201), **_ok("Outcome")}, body="OutcomeReport",
                                     codes=(400, 401, 503))},
    }
    admin = {
        "/admin/keys": {
            "get": _op("List keys (never their hashes)", _ok("KeyList"), admin=True, codes=_ADMIN_ERRORS),
            "post": _op("Create a key; the secret is returned once", _ok("Key", 201), body="KeySpec", admin=True,
                        codes=_ADMIN_ERRORS),
        },
        "/admin/keys/{key_id}": {
            "get": _op("One key", _ok("Key"), admin=True, codes=_ADMIN_ERRORS, params=_KEY_ID),
            "patch": _op("Change attribution, models or tags", _ok("Key"), body="KeySpec", admin=True,
                         codes=_ADMIN_ERRORS, params=_KEY_ID),
            "delete": _op("Revoke (every replica refuses it within 1 s)", _ok("Key"), admin=True,
                          codes=_ADMIN_ERRORS, params=_KEY_ID),
        },
        "/admin/budgets": {
            "get": _op("Budgets with live counters", _ok("BudgetList"), admin=True, codes=_ADMIN_ERRORS),
            "post": _op("Create or replace a budget", _ok("BudgetStatus"), body="Budget", admin=True,
                        codes=_ADMIN_ERRORS),
        },
        "/admin/budgets/{budget_id}": {
            "get": _op("One budget's status", _ok("BudgetStatus"), admin=True, codes=_ADMIN_ERRORS,
                       params=_BUDGET_ID),
            "put": _op("Create or replace a budget", _ok("BudgetStatus"), body="Budget", admin=True,
                       codes=_ADMIN_ERRORS, params=_BUDGET_ID),
            "delete": _op("Delete a budget", _ok("BudgetStatus"), admin=True, codes=_ADMIN_ERRORS,
                          params=_BUDGET_ID),
        },
        "/admin/runs": {"get": _op("Recent agent runs (newest first)", _ok("RunList"), admin=True,
                                   codes=_ADMIN_ERRORS, params=_RUNS_QUERY)},
        "/admin/runs/{run_id}": {"get": _op("One run's steps and the live state of its caps", _ok("Run"), admin=True,
                                            codes=_ADMIN_ERRORS, params=_RUN_ID)},
        "/admin/pools": {"get": _op("Self-hosted pools: replicas, load and autoscaling advice", _ok("Pools"),
                                    admin=True, codes=_ADMIN_ERRORS)},
        "/admin/audit": {"get": _op("The audit log (hash-chained)", _ok("AuditList"), admin=True,
                                    codes=_ADMIN_ERRORS, params=_AUDIT_QUERY)},
        "/admin/audit/verify": {"get": _op("Recompute the audit chain", _ok("AuditVerify"), admin=True,
                                           codes=_ADMIN_ERRORS)},
    }
    ops = {
        "/health": {"get": _op("Liveness, ledger state, circuits", _ok("Health"), security=False)},
        "/metrics": {"get": {"summary": "Prometheus metrics", "security": [], "responses": {
            "200": {"description": "OK", "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
    }
    return {
        "openapi": "3.0.3",
        "info": {"title": "margin gateway", "version": __version__,
                 "description": "OpenAI-compatible gateway that meters, prices, budgets and routes LLM calls."},
        "paths": {**v1, **admin, **ops},
        "components": {
            "schemas": SCHEMAS,
            "responses": {"Error": {"description": "OpenAI-shaped error", "content": _json(_ref("Error"))}},
            "securitySchemes": {
                "virtualKey": {"type": "http", "scheme": "bearer", "description": "a margin key (mk-...)"},
                "adminKey": {"type": "http", "scheme": "bearer", "description": "admin_key from margin.yaml"},
            },
        },
    }


@functools.cache
def document_bytes() -> bytes:
    """Serialised once per process: the document only changes with the code."""
    return orjson.dumps(document())
