"""Fill a running margin gateway with traffic worth looking at in the dashboard, through the
`openai` SDK like any client: three teams on several models with feature tags, cache hits, a team
budget that notifies, downgrades gpt-4o to a lighter model and then blocks, agent runs with tool
steps and posted outcomes, a run stopped by its cap (if the gateway has a run cap on workflow
"refunds"), fallbacks (if it has a model named "flaky"), routed calls (if it has a group "auto"),
a streamed answer and a few mistakes. It creates its keys and budgets through the admin API.

    python scripts/ui_traffic.py --base-url http://127.0.0.1:4000 --admin-key KEY [--json]

Prints the keys it made (team viewer keys included, to sign in to /ui) and what it sent."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import httpx
import openai

TEAMS = {  # team -> (users, app, env)
    "search": (["ana.lima", "ben.okafor"], "assistant", "prod"),
    "support": (["carla.diaz", "eli.tanaka"], "helpdesk", "prod"),
    "growth": (["dan.ruiz"], "campaigns", "staging"),
}
BUDGETS = [
    # downgraded to a lighter model that still costs something, so the traffic reaches the block
    {"id": "growth-monthly", "name": "Growth team", "scope": {"team": "growth"}, "limit_usd": "0.004",
     "period": "month", "thresholds": [{"at": 50, "action": "notify"},
                                       {"at": 60, "action": "downgrade", "map": {"gpt-4o": "LIGHT"}},
                                       {"at": 80, "action": "block"}]},
    {"id": "search-monthly", "name": "Search team", "scope": {"team": "search"}, "limit_usd": "5",
     "period": "month", "thresholds": [{"at": 50, "action": "notify"},
                                       {"at": 80, "action": "downgrade", "map": {"gpt-4o": "gpt-4o-mini"}},
                                       {"at": 100, "action": "block"}]},
    {"id": "support-daily", "name": "Support per day", "scope": {"team": "support"}, "limit_usd": "2",
     "period": "day", "thresholds": [{"at": 80, "action": "notify"}, {"at": 100, "action": "block"}]},
]


class Traffic:
    def __init__(self, base_url: str, admin_key: str):
        self.base = base_url.rstrip("/")
        self.admin = {"Authorization": f"Bearer {admin_key}"}
        self.sent: dict[str, int] = {}

    def _count(self, what: str) -> None:
        self.sent[what] = self.sent.get(what, 0) + 1

    def key(self, **attrs: Any) -> dict[str, Any]:
        r = httpx.post(self.base + "/admin/keys", json=attrs, headers=self.admin, timeout=10)
        r.raise_for_status()
        out: dict[str, Any] = r.json()
        return out

    def budgets(self, models: set[str]) -> None:
        light = "o3-mini" if "o3-mini" in models else "gpt-4o-mini"
        for b in BUDGETS:
            body = json.loads(json.dumps(b).replace('"LIGHT"', json.dumps(light)))
            httpx.put(f"{self.base}/admin/budgets/{b['id']}", json=body, headers=self.admin,
                      timeout=10).raise_for_status()

    def client(self, secret: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base + "/v1", api_key=secret, max_retries=0, timeout=30)

    def chat(self, c: openai.OpenAI, model: str, text: str, tags: str = "", headers: dict[str, str] | None = None,
             **kw: Any) -> int:
        h = {**({"X-Margin-Tags": tags} if tags else {}), **(headers or {})}
        try:
            c.chat.completions.create(model=model, messages=[{"role": "user", "content": text}], max_tokens=16,
                                      extra_headers=h, **kw)
        except openai.APIStatusError as e:
            self._count(f"refused {e.status_code}")
            return e.status_code
        self._count(f"chat {model}")
        return 200

    def outcome(self, secret: str, run_id: str, workflow: str, status: str, value: str) -> None:
        r = httpx.post(self.base + "/v1/outcomes", headers={"Authorization": f"Bearer {secret}"}, timeout=10,
                       json={"run_id": run_id, "workflow": workflow, "status": status, "value_usd": value})
        if r.status_code in (200, 201):
            self._count("outcomes")

    def run(self, c: openai.OpenAI, run_id: str, workflow: str, steps: int, model: str = "gpt-4o-mini") -> None:
        for i in range(steps):
            h = {"X-Margin-Run-Id": run_id, "X-Margin-Workflow": workflow, "X-Margin-Step": str(i + 1),
                 "X-Margin-Agent": f"{workflow}-agent"}
            if i % 2:
                h["X-Margin-Tool"] = "crm.lookup"
            self.chat(c, model, f"{workflow} case {run_id}: step {i + 1}, look up the order history",
                      tags=f"workflow={workflow},feature=agent", headers=h)

    def fill(self) -> dict[str, Any]:
        keys: dict[str, dict[str, Any]] = {}
        for team, (users, app, env) in TEAMS.items():
            for u in users:
                keys[u] = self.key(org="acme", team=team, user=u, app=app, env=env, name=f"{u} ({team})")
            keys[f"{team}-viewer"] = self.key(org="acme", team=team, name=f"{team} dashboard", tags={"role": "viewer"})
        cl = {u: self.client(k["key"]) for u, k in keys.items() if not u.endswith("-viewer")}
        models = {m.id for m in cl["ana.lima"].models.list().data}
        self.budgets(models)

        # search: questions on two models, tagged by feature; the same deterministic question
        # twice, so the second is answered from the cache.
        for i in range(8):
            self.chat(cl["ana.lima" if i % 2 else "ben.okafor"], "gpt-4o-mini", f"Summarise document {i}",
                      tags="feature=summaries")
        for i in range(3):
            self.chat(cl["ana.lima"], "gpt-4o", f"Draft an answer to ticket {i}", tags="feature=faq")
        for _ in range(3):
            self.chat(cl["ben.okafor"], "gpt-4o-mini", "What are the opening hours?", tags="feature=faq", temperature=0)
        stream = cl["ana.lima"].chat.completions.create(model="gpt-4o-mini", stream=True, max_tokens=16,
                                                        messages=[{"role": "user", "content": "Stream a haiku"}])
        for _ in stream:
            pass
        self._count("stream")
        cl["ben.okafor"].embeddings.create(model="gpt-4o-mini", input=["embed this"])
        self._count("embedding")
        if "auto" in models:
            for i in range(4):
                self.chat(cl["ana.lima"], "auto", f"Classify query {i}", tags="feature=chat")

        # support: agent runs of workflow "triage" with outcomes (one fails, one unreported).
        statuses = ["success", "success", "failure", "success", "escalated", ""]
        for i, st in enumerate(statuses):
            run_id = f"triage-{i + 1:03d}"
            self.run(cl["carla.diaz" if i % 2 else "eli.tanaka"], run_id, "triage", 3 + i % 3)
            if st:
                self.outcome(keys["carla.diaz"]["key"], run_id, "triage", st, "12.50" if st == "success" else "0")
        # a run that loops until its cap (when the gateway caps workflow "refunds")
        self.run(cl["eli.tanaka"], "refunds-001", "refunds", 8)
        self.outcome(keys["eli.tanaka"]["key"], "refunds-001", "refunds", "failure", "0")
        if "flaky" in models:
            for i in range(3):
                self.chat(cl["carla.diaz"], "flaky", f"Fallback please {i}", tags="feature=chat")

        # growth: gpt-4o against a tiny budget: notify at 50%, downgrade at 60%, blocked at 80%.
        for i in range(36):
            self.chat(cl["dan.ruiz"], "gpt-4o", f"Write campaign copy variant {i}", tags="feature=copy")

        # mistakes: an unknown model and a bad key
        self.chat(cl["dan.ruiz"], "no-such-model", "hello")
        self.chat(self.client("mk-not-a-real-key"), "gpt-4o-mini", "hello")
        return {"keys": {u: {"key": k["key"], "key_id": k["key_id"], "team": k["team"]} for u, k in keys.items()},
                "sent": dict(sorted(self.sent.items()))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:4000")
    p.add_argument("--admin-key", required=True)
    p.add_argument("--json", action="store_true", help="print the keys and counts as JSON")
    a = p.parse_args(argv)
    try:
        out = Traffic(a.base_url, a.admin_key).fill()
    except httpx.HTTPStatusError as e:
        print(f"error: the admin API refused {e.request.method} {e.request.url.path}: "
              f"{e.response.status_code} {e.response.text[:200]}", file=sys.stderr)
        return 1
    except (httpx.HTTPError, openai.APIConnectionError) as e:
        print(f"error: cannot reach the gateway at {a.base_url}: {e}", file=sys.stderr)
        return 1
    if a.json:
        print(json.dumps(out, indent=2))
    else:
        for u, k in out["keys"].items():
            print(f"{u:14} {k['team']:8} {k['key']}")
        for what, n in out["sent"].items():
            print(f"{n:4}  {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
