"""schemathesis against the gateway's own OpenAPI document (/openapi.json): generated and mutated
requests to /v1 and /admin must never get a 5xx that is margin's fault (`not_a_server_error`).

Short here (`MARGIN_FUZZ_EXAMPLES`, default 15 per operation); `make soak` runs it longer."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Gateway, Mock, gateway_config, start_gateway, stop

EXAMPLES = int(os.environ.get("MARGIN_FUZZ_EXAMPLES", "15"))
ST = Path(sys.executable).parent / "schemathesis"


@pytest.fixture(scope="module")
def fuzz_gateway(mock_upstream: Mock, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("fuzz")
    cfg = gateway_config(tmp, mock_upstream.url, f"sqlite:///{tmp}/ledger.db",
                         budgets=[{"id": "fuzz", "scope": {"team": "fuzz"}, "limit_usd": 100}],
                         rate_limits=[{"id": "k", "scope": {"key": "*"}, "rpm": 100000}])
    gw = start_gateway(tmp, cfg)
    yield gw
    assert gw.proc is not None
    stop(gw.proc)


def test_openapi_document_is_served(fuzz_gateway: Gateway) -> None:
    doc = httpx.get(fuzz_gateway.url + "/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    assert {"/v1/chat/completions", "/v1/embeddings", "/admin/keys", "/admin/budgets/{budget_id}"} <= set(doc["paths"])


def _schemathesis(gw: Gateway, token: str, include: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    cmd = [str(ST), "run", gw.url + "/openapi.json", "--url", gw.url, "--checks", "not_a_server_error",
           "--max-examples", str(EXAMPLES), "--include-path-regex", include, "--header",
           f"Authorization: Bearer {token}", "--seed", "1", "--workers", "1", "--no-color",
           "--request-timeout", "30", "--generation-database", "none", "--phases", "examples,coverage,fuzzing",
           "--suppress-health-check", "all", "--report", "junit", "--report-dir", str(tmp)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp)


@pytest.mark.parametrize("surface", ["v1", "admin"])
def test_no_server_errors_under_fuzzing(fuzz_gateway: Gateway, surface: str, tmp_path: Path) -> None:
    if surface == "v1":
        token = fuzz_gateway.create_key(team="fuzz")["key"]
        include = "^/v1/"
    else:
        token = fuzz_gateway.admin_key
        include = "^/admin/"
    r = _schemathesis(fuzz_gateway, token, include, tmp_path)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    log = fuzz_gateway.log.read_text(errors="replace")
    assert "Traceback" not in log, log[-4000:]
