"""Turn an HTTP request into a validated payload and a `Call` summary, or a precise 400."""

from __future__ import annotations

import re
from typing import Any

import orjson

from margin.domain import Attribution, Call, Endpoint, VirtualKey
from margin.gateway.errors import BadRequest, Forbidden

MAX_TAGS = 20
_TAG_KEY = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
# Control characters (and DEL) never enter a value margin keeps: header values, tags and names go
# to the ledger, spans and logs, where a newline or an escape sequence could forge a line.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_HEADER_VALUE = 256
MAX_MESSAGES = 4096  # hard ceiling on a chat request's messages; a key tag max_messages lowers it
MAX_MODEL_NAME = 256
# Key tags that are policy, not attribution: only an administrator sets them (on the key); a
# request's X-Margin-Tags may not, or a client could lift its own limits or logging choice.
RESERVED_TAGS = frozenset({"log_payloads", "max_tokens", "max_messages"})
_RUN_HEADERS = ("x-margin-run-id", "x-margin-workflow", "x-margin-agent", "x-margin-step", "x-margin-tool",
                "x-margin-priority", "x-request-id")
_REQUIRED: dict[str, tuple[str, str]] = {
    "chat": ("messages", "a non-empty array of message objects"),
    "completion": ("prompt", "a string or an array of strings/tokens"),
    "embedding": ("input", "a string or an array of strings/tokens"),
    "response": ("input", "a string or a non-empty array of input items"),
}
# The output-token cap's name per endpoint (the Responses API renamed it).
MAX_TOKENS_FIELD: dict[str, str] = {"response": "max_output_tokens"}


def parse_json(body: bytes) -> dict[str, Any]:
    if not body:
        raise BadRequest("The request body is empty; expected a JSON object", code="invalid_json")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise BadRequest(f"The request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise BadRequest(f"The request body must be a JSON object, not {type(data).__name__}", code="invalid_json")
    return data


def _check_fields(endpoint: Endpoint, p: dict[str, Any]) -> None:
    model = p.get("model")
    if model is None:
        raise BadRequest("Missing required parameter: 'model'", param="model", code="missing_required_parameter")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' must be a non-empty string", param="model", code="invalid_type")
    if len(model) > MAX_MODEL_NAME or _CONTROL.search(model):
        raise BadRequest(f"'model' must be at most {MAX_MODEL_NAME} characters without control characters",
                         param="model", code="invalid_value")
    field, what = _REQUIRED[endpoint]
    value = p.get(field)
    if value is None:
        raise BadRequest(f"Missing required parameter: '{field}'", param=field, code="missing_required_parameter")
    if endpoint == "response" and p.get("background"):
        raise BadRequest("'background' responses are polled with GET /v1/responses/{id}, which margin does not "
                         "proxy; send the call without it (margin's batch lane defers work: "
                         "X-Margin-Priority: low)", param="background", code="unsupported_parameter")
    if endpoint == "response" and isinstance(value, list):
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                raise BadRequest(f"'input[{i}]' must be an input item object", param=f"input[{i}]",
                                 code="invalid_type")
    if endpoint == "chat":
        if not isinstance(value, list) or not value:
            raise BadRequest(f"'messages' must be {what}", param="messages", code="invalid_type")
        for i, m in enumerate(value):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise BadRequest(f"'messages[{i}]' must be an object with a string 'role'",
                                 param=f"messages[{i}]", code="invalid_type")
    elif not isinstance(value, str | list) or (isinstance(value, list) and not value):
        raise BadRequest(f"'{field}' must be {what}", param=field, code="invalid_type")
    stream = p.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean", param="stream", code="invalid_type")
    if stream and endpoint == "embedding":
        raise BadRequest("Embeddings cannot be streamed", param="stream", code="invalid_value")
    for name in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        v = p.get(name)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise BadRequest(f"'{name}' must be a positive integer", param=name, code="invalid_value")


def parse_tags(header: str | None) -> tuple[tuple[str, str], ...]:
    """`X-Margin-Tags: workflow=kyc,feature=x` -> (("feature","x"), ("workflow","kyc"))."""
    if not header:
        return ()
    tags: dict[str, str] = {}
    for item in header.split(","):
        item = item.strip()
        if not item:
            continue
        k, sep, v = item.partition("=")
        k, v = k.strip(), v.strip()
        if not sep or not _TAG_KEY.match(k):
            raise BadRequest(f"X-Margin-Tags: '{item}' is not key=value with a key of letters, digits, '_.-' "
                             "(at most 64)", param="X-Margin-Tags", code="invalid_tags")
        if len(v) > 128 or _CONTROL.search(v):
            raise BadRequest(f"X-Margin-Tags: the value of '{k}' must be at most 128 characters without "
                             "control characters", param="X-Margin-Tags", code="invalid_tags")
        tags[k] = v
    if len(tags) > MAX_TAGS:
        raise BadRequest(f"X-Margin-Tags: at most {MAX_TAGS} tags per request (got {len(tags)})",
                         param="X-Margin-Tags", code="invalid_tags")
    return tuple(sorted(tags.items()))


def attribution_for(key: VirtualKey, request_tags: tuple[tuple[str, str], ...]) -> Attribution:
    """Key tags are defaults; request tags add to them and win on conflict."""
    merged = dict(key.tags)
    merged.update(request_tags)
    return Attribution(key.org, key.team, key.user, key.app, key.env, key.key_id, tuple(sorted(merged.items())))


_TIERS = ("premium", "standard", "batch")


def check_headers(headers: dict[str, str]) -> None:
    """Run/trace headers are kept verbatim (ledger, spans): bounded, and no control characters."""
    for name in _RUN_HEADERS:
        v = headers.get(name)
        if v is not None and (len(v) > MAX_HEADER_VALUE or _CONTROL.search(v)):
            raise BadRequest(f"{name}: at most {MAX_HEADER_VALUE} characters without control characters",
                             param=name, code="invalid_header")


def _key_limit(key: VirtualKey, name: str) -> int | None:
    raw = dict(key.tags).get(name)
    if raw is None:
        return None
    if not (raw.isascii() and raw.isdigit()) or int(raw) < 1:
        # Fail closed: a limit the administrator meant to set must not silently become no limit.
        raise Forbidden(f"The key {key.key_id} has an invalid '{name}' tag ({raw!r}); an administrator must fix it",
                        code="key_misconfigured")
    return int(raw)


def apply_key_limits(endpoint: Endpoint, payload: dict[str, Any], key: VirtualKey) -> None:
    """Per-key ceilings (key tags `max_tokens`, `max_messages`). A request above the key's
    `max_tokens` is refused; one without `max_tokens` gets the ceiling, so it is always bounded."""
    listed = "messages" if endpoint == "chat" else "input" if endpoint == "response" else ""
    if listed and isinstance(payload[listed], list):
        cap = min(MAX_MESSAGES, _key_limit(key, "max_messages") or MAX_MESSAGES)
        n = len(payload[listed])
        if n > cap:
            raise BadRequest(f"'{listed}' has {n} {'messages' if listed == 'messages' else 'items'}; this key "
                             f"allows at most {cap}", param=listed, code="too_many_messages")
    if endpoint == "embedding":
        return
    ceiling = _key_limit(key, "max_tokens")
    if ceiling is None:
        return
    asked = max_tokens_of(endpoint, payload)
    if asked is None:
        payload[MAX_TOKENS_FIELD.get(endpoint, "max_tokens")] = ceiling
    elif asked > ceiling:
        name = MAX_TOKENS_FIELD.get(endpoint) or (
            "max_completion_tokens" if payload.get("max_completion_tokens") else "max_tokens")
        raise BadRequest(f"'{name}' is {asked}; this key allows at most {ceiling} output tokens", param=name,
                         code="max_tokens_too_large")


def max_tokens_of(endpoint: Endpoint, payload: dict[str, Any]) -> int | None:
    """The client's output-token cap, whatever the endpoint calls it."""
    if endpoint == "response":
        v = payload.get("max_output_tokens")
    else:
        v = payload.get("max_completion_tokens") or payload.get("max_tokens")
    return v if isinstance(v, int) else None


def build_call(endpoint: Endpoint, payload: dict[str, Any], headers: dict[str, str], key: VirtualKey) -> Call:
    _check_fields(endpoint, payload)
    check_headers(headers)
    apply_key_limits(endpoint, payload, key)
    tier = headers.get("x-margin-tier")
    if tier is not None and tier not in _TIERS:
        raise BadRequest(f"X-Margin-Tier must be one of {', '.join(_TIERS)}, not '{tier}'", param="X-Margin-Tier",
                         code="invalid_tier")
    tags = parse_tags(headers.get("x-margin-tags"))
    reserved = sorted(k for k, _ in tags if k in RESERVED_TAGS)
    if reserved:
        raise BadRequest(f"X-Margin-Tags: {', '.join(reserved)} can only be set on the key by an administrator",
                         param="X-Margin-Tags", code="invalid_tags")
    attribution = attribution_for(key, tags)
    tag_map = dict(attribution.tags)
    max_tokens = max_tokens_of(endpoint, payload)
    return Call(
        endpoint=endpoint,
        requested_model=payload["model"],
        stream=bool(payload.get("stream", False)),
        attribution=attribution,
        max_tokens=max_tokens,
        run_id=headers.get("x-margin-run-id", ""),
        workflow=headers.get("x-margin-workflow") or tag_map.get("workflow", ""),
        agent=headers.get("x-margin-agent", ""),
        step=headers.get("x-margin-step", ""),
        tool=headers.get("x-margin-tool", ""),
        # A key's default tier/priority are its tags (keys create --tags tier=premium,priority=low).
        tier=headers.get("x-margin-tier") or tag_map.get("tier", ""),
        priority=headers.get("x-margin-priority") or tag_map.get("priority", ""),
        has_tools=bool(payload.get("tools")),
    )
