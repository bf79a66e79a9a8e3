"""OTLP spans reach a real local HTTP collector with the OpenTelemetry GenAI attributes."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, HTTPServer

from margin.domain import Attribution, Cost, Event, Usage
from margin.telemetry import Telemetry


def test_spans_are_exported_with_genai_attributes() -> None:
    received: list[bytes] = []

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        t = Telemetry(f"http://127.0.0.1:{server.server_port}/v1/traces", "margin-test")
        now = datetime.now(UTC)
        t.observe(Event(event_id="e1", ts_start=now, ts_end=now, request_id="r", endpoint="chat",
                        attribution=Attribution(team="t", user="u"), requested_model="gpt-4o-mini",
                        model="gpt-4o-mini", provider="mock", run_id="run-9",
                        usage=Usage(input_tokens=10, output_tokens=3, cached_input_tokens=4),
                        cost=Cost(input_usd=Decimal("0.001"))))
        t.shutdown()
    finally:
        server.shutdown()
    assert received, "no OTLP export arrived"
    blob = b"".join(received)
    for name in (b"chat gpt-4o-mini", b"gen_ai.request.model", b"gen_ai.usage.input_tokens",
                 b"gen_ai.usage.cache_read.input_tokens", b"gen_ai.conversation.id", b"run-9", b"margin-test"):
        assert name in blob, name
