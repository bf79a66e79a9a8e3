"""Every metric and span name margin emits, in one place.

Prometheus names follow the OpenTelemetry GenAI semantic conventions mapped the standard way
(dots to underscores, unit suffix). Per-user labels never go to Prometheus (cardinality): they
are in the ledger and in spans."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from margin.domain import Event

# OpenTelemetry GenAI attribute names (semantic conventions, development status).
ATTR_OPERATION = "gen_ai.operation.name"
ATTR_PROVIDER = "gen_ai.provider.name"
ATTR_REQUEST_MODEL = "gen_ai.request.model"
ATTR_RESPONSE_MODEL = "gen_ai.response.model"
ATTR_INPUT_TOKENS = "gen_ai.usage.input_tokens"
ATTR_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
ATTR_CACHE_READ = "gen_ai.usage.cache_read.input_tokens"
ATTR_REASONING = "gen_ai.usage.reasoning.output_tokens"
ATTR_CONVERSATION = "gen_ai.conversation.id"
ATTR_AGENT = "gen_ai.agent.name"
ATTR_COST = "gen_ai.usage.cost"  # not standard; OpenLIT's name
ATTR_ERROR = "error.type"

OPERATION = {"chat": "chat", "completion": "text_completion", "embedding": "embeddings", "response": "chat",
             "batch": "chat"}

_TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304)
_DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
_TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0)
_OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1)

_GENAI = ("gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model", "gen_ai_response_model")


class Telemetry:
    """Prometheus instruments (own registry, so tests and several apps in one process don't
    collide) and optional OTLP spans."""

    def __init__(self, otlp_endpoint: str | None = None, service_name: str = "margin"):
        r = self.registry = CollectorRegistry()
        self.token_usage = Histogram(
            "gen_ai_client_token_usage", "Tokens used per call, by type (input includes cached)",
            [*_GENAI, "gen_ai_token_type"], registry=r, buckets=_TOKEN_BUCKETS,
        )
        self.duration = Histogram(
            "gen_ai_client_operation_duration_seconds", "Whole call duration as the client sees it",
            [*_GENAI, "error_type"], registry=r, buckets=_DURATION_BUCKETS,
        )
        self.ttft = Histogram(
            "gen_ai_server_time_to_first_token_seconds", "Time to the first streamed token",
            list(_GENAI), registry=r, buckets=_TTFT_BUCKETS,
        )
        self.tpot = Histogram(
            "gen_ai_server_time_per_output_token_seconds", "Mean time between output tokens after the first",
            list(_GENAI), registry=r, buckets=_TPOT_BUCKETS,
        )
        self.overhead = Histogram(
            "margin_gateway_overhead_seconds", "Time margin adds to a call (total minus upstream time)",
            ["endpoint"], registry=r, buckets=_OVERHEAD_BUCKETS,
        )
        self.cost = Counter("margin_cost_usd", "Metered spend in USD", ["team", "model", "provider"], registry=r)
        self.requests = Counter(
            "margin_requests", "Calls handled, refused ones included", ["endpoint", "model", "status"], registry=r
        )
        self.energy = Counter("margin_energy_joules", "Estimated energy of calls", ["model"], registry=r)
        self.budget_actions = Counter(
            "margin_budget_actions", "Budget and rate-limit actions (notify, downgrade, defer, block, rate_limit)",
            ["budget", "action"], registry=r)
        self.cache_lookups = Counter(
            "margin_cache_lookups", "Cache lookups by result (hit, semantic_hit, miss)", ["result"], registry=r)
        self.budget_used = Gauge(
            "margin_budget_used_ratio", "Spent + reserved over the limit, per budget (its busiest counter), "
            "as this replica last saw it", ["budget"], registry=r)
        self._budget_usage: Callable[[], dict[str, float]] | None = None
        self.run_stops = Counter(
            "margin_run_stops", "Agent runs stopped by a run cap, by cap and the limit that hit", ["cap", "limit"],
            registry=r)
        self.state_failures = Counter(
            "margin_budget_state_failures", "Budget state backend unreachable, by configured mode", ["mode"],
            registry=r)
        self.ledger_queue = Gauge("margin_ledger_queue_depth", "Events waiting for the ledger writer", registry=r)
        self.ledger_up = Gauge("margin_ledger_store_up", "1 if the ledger store accepts writes", registry=r)
        self.ledger_written = Gauge("margin_ledger_events_written", "Events written to the store", registry=r)
        self.ledger_spooled = Gauge("margin_ledger_events_spooled", "Events written to the disk spool", registry=r)
        self.ledger_replayed = Gauge("margin_ledger_events_replayed", "Spooled events replayed", registry=r)
        # Self-hosted pools (gateway/pools.py, docs/selfhosted.md): pool and replica names come from
        # margin.yaml, never from clients, so these label sets stay bounded.
        self.pool_recommended = Gauge(
            "margin_recommended_replicas", "Replicas margin recommends for a self-hosted pool (a KEDA/HPA target)",
            ["pool"], registry=r)
        self.pool_recommended_cost = Gauge(
            "margin_recommended_cost_usd_per_hour", "Hourly cost of the recommended replicas", ["pool"], registry=r)
        self.pool_replica_load = Gauge(
            "margin_pool_replica_load", "Requests queued and running on a replica (scraped, plus margin's own since)",
            ["pool", "replica"], registry=r)
        self.pool_replica_up = Gauge(
            "margin_pool_replica_up", "1 if the replica accepts connections, 0 if it refused them", ["pool", "replica"],
            registry=r)
        self.pool_queue = Gauge("margin_pool_queue_depth", "Requests waiting in a pool's engines", ["pool"], registry=r)
        self._tracer: Any = None
        self._provider: Any = None
        if otlp_endpoint:
            self._provider = _make_provider(otlp_endpoint, service_name)
            self._tracer = self._provider.get_tracer("margin")

    def shutdown(self) -> None:
        """Flush spans still batched for export."""
        if self._provider is not None:
            self._provider.shutdown()

    def bind_ledger(self, stats: Callable[[], dict[str, float]]) -> None:
        """Ledger gauges are read at scrape time, not updated per request."""
        for name, gauge in (("queued", self.ledger_queue), ("store_up", self.ledger_up),
                            ("written", self.ledger_written), ("spooled", self.ledger_spooled),
                            ("replayed", self.ledger_replayed)):
            gauge.set_function(_reader(stats, name))

    def observe(self, e: Event, upstream_s: float | None = None) -> None:
        op = OPERATION.get(e.endpoint, e.endpoint)
        # Label values must come from configuration, never from what a client typed: a refused
        # request for an unknown model has no model label (bounded cardinality).
        genai = (op, e.provider or "none", e.requested_model if e.model else "_unrouted", e.model or "none")
        self.requests.labels(e.endpoint, e.model or "_unrouted", str(e.status)).inc()
        if e.cache_hit == "semantic":  # exact lookups are counted where they happen (gateway/caching.py)
            self.cache_lookups.labels("semantic_hit").inc()
        elif e.actions and any(a.get("action") == "semantic_miss" for a in e.actions):
            self.cache_lookups.labels("semantic_miss").inc()
        self.duration.labels(*genai, e.error_type).observe(e.latency_ms / 1000)
        if upstream_s is not None:
            self.overhead.labels(e.endpoint).observe(max(0.0, e.latency_ms / 1000 - upstream_s))
        u = e.usage
        if u.input_tokens:
            self.token_usage.labels(*genai, "input").observe(u.input_tokens)
        if u.output_tokens:
            self.token_usage.labels(*genai, "output").observe(u.output_tokens)
        if e.ttft_ms is not None:
            self.ttft.labels(*genai).observe(e.ttft_ms / 1000)
        if e.tpot_ms is not None:
            self.tpot.labels(*genai).observe(e.tpot_ms / 1000)
        total = e.cost.total_usd
        if total:
            self.cost.labels(e.attribution.team, e.model, e.provider).inc(float(total))
        if e.energy_j:
            self.energy.labels(e.model).inc(e.energy_j)
        if self._tracer is not None:
            self._span(e, op)

    def _span(self, e: Event, op: str) -> None:
        u = e.usage
        attrs: dict[str, Any] = {
            ATTR_OPERATION: op, ATTR_PROVIDER: e.provider, ATTR_REQUEST_MODEL: e.requested_model,
            ATTR_RESPONSE_MODEL: e.model, ATTR_INPUT_TOKENS: u.input_tokens, ATTR_OUTPUT_TOKENS: u.output_tokens,
            ATTR_CACHE_READ: u.cached_input_tokens, ATTR_REASONING: u.reasoning_tokens,
            ATTR_COST: float(e.cost.total_usd), "margin.event_id": e.event_id, "margin.team": e.attribution.team,
            "margin.user": e.attribution.user, "margin.app": e.attribution.app, "http.response.status_code": e.status,
        }
        if e.run_id:
            attrs[ATTR_CONVERSATION] = e.run_id
        if e.agent:
            attrs[ATTR_AGENT] = e.agent
        if e.error_type:
            attrs[ATTR_ERROR] = e.error_type
        span = self._tracer.start_span(
            f"{op} {e.requested_model}", start_time=int(e.ts_start.timestamp() * 1e9), attributes=attrs
        )
        span.end(end_time=int(e.ts_end.timestamp() * 1e9))

    def bind_budgets(self, usage: Callable[[], dict[str, float]]) -> None:
        """Budget utilisation is computed at scrape time from the guard's counter snapshot."""
        self._budget_usage = usage

    def render(self) -> bytes:
        if self._budget_usage is not None:
            self.budget_used.clear()
            for budget, ratio in self._budget_usage().items():
                self.budget_used.labels(budget).set(ratio)
        return generate_latest(self.registry)


def _reader(stats: Callable[[], dict[str, float]], name: str) -> Callable[[], float]:
    return lambda: stats()[name]


def _make_provider(endpoint: str, service_name: str) -> Any:
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as e:
        raise RuntimeError("telemetry.otlp_endpoint needs the optional extra: pip install 'margin[otel]'") from e
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    return provider
