"""The warehouse's queries against a real SQLite ledger: exact sums equal to the ledger's, the
Python reference report, team restriction enforced in SQL, money saved per lever."""

from __future__ import annotations

import asyncio
import itertools
import random
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest

from margin.analytics import actions as act
from margin.analytics import queries as q
from margin.analytics import rollup
from margin.analytics import runs as R
from margin.analytics.filters import Filter, parse_period
from margin.analytics.outcomes import parse_outcome
from margin.analytics.report import spend
from margin.analytics.synthetic import event_row, events
from margin.analytics.warehouse import Warehouse, savings_of
from margin.ledger import open_store
from tests.conftest import BACKENDS, fresh_ledger

T0 = datetime(2026, 11, 1, tzinfo=UTC)
NOW = datetime(2026, 11, 20, 12, tzinfo=UTC)


def build_ledger(url: str, n: int = 3000, outcomes: bool = True) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Synthetic events over 20 days of November plus one outcome per run (some escalated first
    and resolved later, some failed, some never reported)."""
    rows = list(events(n, T0, 20, seed=11))
    outs: list[dict[str, Any]] = []
    if outcomes:
        rng = random.Random(5)
        runs = sorted({r["run_id"] for r in rows if r["run_id"]})
        for i, run in enumerate(runs):
            if i % 7 == 0:
                continue  # never reported
            status = "success" if i % 3 else "failure"
            if i % 5 == 0:  # escalated first, resolved later: the latest counts
                outs.append(parse_outcome({"run_id": run, "status": "escalated", "ts": "2026-11-25T00:00:00Z"}))
            outs.append(parse_outcome({"run_id": run, "status": status, "value_usd": str(rng.randint(1, 9)),
                                       "ts": "2026-11-26T00:00:00Z"}))

    async def write() -> None:
        st = open_store(url)
        await st.open()
        await st.write_events(rows)
        for o in outs:
            await st.insert_outcome(o)
        await st.close()

    asyncio.run(write())
    return rows, outs


@pytest.fixture(scope="module")
def ledger(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Warehouse, list[dict[str, Any]], str]]:
    url = f"sqlite:///{tmp_path_factory.mktemp('wh')}/l.db"
    rows, _ = build_ledger(url)
    wh = Warehouse(url)
    wh.refresh_blocking()
    yield wh, rows, url
    wh.close()


def test_spend_by_matches_the_python_reference(ledger: tuple[Warehouse, list[dict[str, Any]], str]) -> None:
    wh, rows, _ = ledger
    for by in (["team", "model"], ["tag:feature", "day"], ["user"]):
        got = {tuple(r[b] for b in by): r for r in q.spend_by(wh, Filter(), by)}
        ref = {tuple(r[b] for b in by): r for r in spend(rows, by)}
        assert got.keys() == ref.keys()
        for k, r in ref.items():
            g = got[k]
            assert Decimal(g["cost_usd"]) == Decimal(r["cost_usd"]), k
            assert (g["requests"], g["errors"], g["input_tokens"], g["output_tokens"]) == (
                r["requests"], r["errors"], r["input_tokens"], r["output_tokens"])
            assert g["p95_ms"] == pytest.approx(r["p95_ms"], abs=0.06)


def test_team_restriction_is_in_every_query(ledger: tuple[Warehouse, list[dict[str, Any]], str]) -> None:
    wh, rows, _ = ledger
    f = Filter(team="legal")
    legal = [r for r in rows if r["team"] == "legal"]
    assert {r["team"] for r in q.spend_by(wh, f, ["team"])} == {"legal"}
    assert Decimal(q.overview(wh, f, NOW)["cost_usd"]) == sum(Decimal(r["cost_usd"]) for r in legal)
    assert {r["key"] for r in q.top_spenders(wh, f, "team")} == {"legal"}
    assert sum(int(r["requests"]) for r in q.model_mix(wh, f)) == len(legal)
    assert sum(Decimal(r["cost_usd"]) for r in q.spend_series(wh, f, "model", "day")) == sum(
        Decimal(r["cost_usd"]) for r in legal)
    legal_runs = {r["run_id"] for r in legal if r["run_id"]}
    assert {r["run_id"] for r in R.runs(wh, f, limit=10_000)} == legal_runs
    assert sum(x["runs"] for x in R.cost_per_outcome(wh, f)) == len(legal_runs)
    other = next(r["run_id"] for r in rows if r["run_id"] and r["team"] != "legal")
    assert R.run_steps(wh, other, f) == []
    assert R.run_steps(wh, other) != []


def test_overview_and_series(ledger: tuple[Warehouse, list[dict[str, Any]], str]) -> None:
    wh, rows, _ = ledger
    ov = q.overview(wh, Filter(since=T0, until=NOW), NOW)
    in_range = [r for r in rows if r["ts_start"] < NOW.isoformat()]
    assert ov["requests"] == len(in_range)
    assert ov["error_rate"] == round(sum(r["status"] >= 400 for r in in_range) / len(in_range), 4)
    assert ov["cache_hit_rate"] == round(sum(r["cache_hit"] is not None for r in in_range) / len(in_range), 4)
    today = [r for r in rows if "2026-11-20T00" <= r["ts_start"] < NOW.isoformat()]
    assert Decimal(ov["spend_today_usd"]) == sum(Decimal(r["cost_usd"]) for r in today)
    assert ov["spend_last_month_usd"] == "0" and ov["month_change"] is None
    series = q.spend_series(wh, Filter(), "user", "day", top=3)
    assert len({r["key"] for r in series} - {"other"}) == 3
    assert sum(Decimal(r["cost_usd"]) for r in series) == sum(Decimal(r["cost_usd"]) for r in rows)
    hours = q.spend_series(wh, Filter(since=T0, until=T0 + timedelta(days=1)), None, "hour")
    assert all(r["bucket"].startswith("2026-11-01T") for r in hours)


def test_levers_sum_saved_entries_and_fall_back(ledger: tuple[Warehouse, list[dict[str, Any]], str]) -> None:
    wh, rows, _ = ledger
    want: dict[str, Decimal] = {}
    for r in rows:
        if r["lever"]:
            want[r["lever"]] = want.get(r["lever"], Decimal(0)) + Decimal(r["avoided_cost_usd"])
    got = {r["lever"]: Decimal(r["saved_usd"]) for r in q.levers(wh, Filter())}
    assert got == want and set(got) == {"cache", "compression"}
    # Several levers on one event: each entry counts for its own lever.
    row = {"event_id": "e", "lever": "routing,compression", "avoided_cost_usd": "0.3", "tokens_saved": 30,
           "actions": orjson.dumps([{"action": "saved", "lever": "routing", "usd": "0.1", "tokens": 0},
                                    {"action": "saved", "lever": "compression", "usd": "0.2", "tokens": 30}]).decode()}
    assert sorted(savings_of(row)) == [("e", "compression", "0.2", 30), ("e", "routing", "0.1", 0)]


def test_reroutes_burn_down_and_steps(ledger: tuple[Warehouse, list[dict[str, Any]], str]) -> None:
    wh, rows, _ = ledger
    down = [r for r in q.reroutes(wh, Filter()) if r["kind"] == "downgrade"]
    assert sum(r["calls"] for r in down) == sum('"downgrade"' in r["actions"] for r in rows)
    start, end = parse_period("2026-11")
    burn = q.burn_down(wh, Filter(), {"team": "search", "user": "*"}, start, end, Decimal(100), NOW)
    search = sum(Decimal(r["cost_usd"]) for r in rows if r["team"] == "search" and r["ts_start"] < NOW.isoformat())
    assert Decimal(burn[-1]["cumulative_usd"]) == search
    assert Decimal(burn[-1]["remaining_usd"]) == Decimal(100) - search
    run = next(r["run_id"] for r in rows if r["run_id"])
    steps = R.run_steps(wh, run)
    assert [s["step"] for s in steps] == [r["step"] for r in rows if r["run_id"] == run]


def test_refresh_is_incremental_and_a_new_ledger_resets(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/a.db"
    rows = [event_row(random.Random(i), T0 + timedelta(hours=i), "search") for i in range(50)]

    async def write(u: str, rs: list[dict[str, Any]]) -> None:
        st = open_store(u)
        await st.open()
        await st.write_events(rs)
        await st.close()

    asyncio.run(write(url, rows[:30]))
    path = tmp_path / "wh.duckdb"
    wh = Warehouse(url, path)
    assert wh.refresh_blocking().events == 30
    wh.close()
    asyncio.run(write(url, rows[20:]))
    wh = Warehouse(url, path)  # kept on disk: only the new rows are read
    assert wh.refresh_blocking().events == 20 and wh.counts()["events"] == 50
    wh.close()
    other = f"sqlite:///{tmp_path}/b.db"
    asyncio.run(write(other, rows[:5]))
    wh = Warehouse(other, path)
    wh.refresh_blocking()
    assert wh.counts()["events"] == 5  # never mixes two ledgers
    wh.close()


# -- the hourly rollup and the bounded de-duplication (issue 9: fresh pages at 1M events) -----------

MEASURES = ", ".join(f"sum({m}) AS {m}" for m in rollup.MEASURES)
DIMS = ", ".join(f'"{d}"' for d in rollup.DIMS)


def _rollup_equals_events(wh: Warehouse) -> None:
    """The rollup table holds exactly the per-hour sums of the events copied so far."""
    src, params = rollup.source(Filter(), rollup.DIMS, use_rollup=False)
    want = wh.query(f"SELECT date_trunc('hour', ts) AS hour, {DIMS}, {MEASURES} FROM ({src}) s "
                    "GROUP BY ALL ORDER BY ALL", params)
    got = wh.query(f"SELECT hour, {DIMS}, {MEASURES} FROM hourly GROUP BY ALL ORDER BY ALL")
    assert got == want
    # budget actions derived at copy time = the JSON of every event's `actions`, parsed in SQL
    acts = wh.query(
        "WITH a AS (SELECT event_id, ts_start, team, unnest(from_json(actions, '[\"json\"]')) AS x FROM events), "
        "b AS (SELECT event_id, ts_start, team, x->>'action' AS action, unnest(coalesce(from_json(x->'budgets', "
        "'[\"varchar\"]'), [x->>'budget'])) AS budget FROM a WHERE x->>'action' IN ('downgrade', 'block', 'defer')) "
        "SELECT event_id, budget, action, ts_start, team FROM b WHERE budget IS NOT NULL ORDER BY ALL")
    assert acts == wh.query("SELECT event_id, budget, action, ts_start, team FROM budget_acts ORDER BY ALL")
    n = wh.query("SELECT count(*) AS n, count(DISTINCT event_id) AS ids FROM events")[0]
    assert n["n"] == n["ids"]  # no event twice


def test_synthetic_ids_are_uuid7_in_time_order() -> None:
    rows = list(events(200, T0, 3, seed=2))
    for r in rows:
        u = uuid.UUID(r["event_id"])
        assert u.version == 7 and u.variant == uuid.RFC_4122
        assert u.int >> 80 == int(datetime.fromisoformat(r["ts_start"]).timestamp() * 1000)
    by_time = sorted(rows, key=lambda r: (r["ts_start"], r["event_id"]))
    assert [r["event_id"][:13] for r in by_time] == sorted(r["event_id"][:13] for r in rows)
    assert list(events(200, T0, 3, seed=2)) == rows  # deterministic for a seed


@pytest.mark.parametrize("f", [
    Filter(),
    Filter(since=T0 + timedelta(days=2, hours=5, minutes=17, seconds=3), until=NOW - timedelta(minutes=13)),
    Filter(since=T0 + timedelta(days=3), until=T0 + timedelta(days=3, minutes=40)),  # inside one hour
    Filter(since=T0 + timedelta(days=3, minutes=10), until=T0 + timedelta(days=3, hours=2, minutes=5), team="legal"),
    Filter(until=NOW + timedelta(seconds=1), team="support", where=(("model", "gpt-4o"),)),
    Filter(since=T0 + timedelta(hours=30, minutes=1), where=(("workflow", "triage"), ("env", "prod"))),
    Filter(since=T0 + timedelta(days=1), until=NOW, where=(("user", "u7"),)),  # not in the rollup: events
])
@pytest.mark.parametrize("dims", [(), ("model",), ("team", "workflow"), ("tag:feature",), ("user",)])
def test_rollup_source_is_exactly_the_events(ledger: tuple[Warehouse, list[dict[str, Any]], str], f: Filter,
                                             dims: tuple[str, ...]) -> None:
    wh, rows, _ = ledger
    names = "".join(f', "{d}"' for d in dims)
    # an hour boundary, and instants of real calls: an event exactly at a cut belongs to the later side
    instants = sorted(datetime.fromisoformat(r["ts_start"]) for r in rows)
    cuts = [T0 + timedelta(days=1), *(instants[len(instants) * k // 5] for k in (1, 2, 3, 4))]
    sums = ", ".join(f"sum(cost_usd) FILTER (WHERE ts >= ? AND ts < ?) AS c{i}" for i in range(len(cuts) - 1))
    out = []
    for use in (True, False):
        src, params = rollup.source(f, dims, use_rollup=use)
        by_hour = wh.query(f"SELECT date_trunc('hour', ts) AS h{names}, {MEASURES} FROM ({src}) s "
                           "GROUP BY ALL ORDER BY ALL", params)
        src, params = rollup.source(f, dims, cuts=cuts, use_rollup=use)
        pairs = [t.replace(tzinfo=None) for a, b in itertools.pairwise(cuts) for t in (a, b)]
        cut = wh.query(f"SELECT {sums}, {MEASURES} FROM ({src}) s", [*pairs, *params])
        out.append((by_hour, cut))
    assert out[0] == out[1]
    assert out[0][0] or f.team == "support"  # the filters select something (gpt-4o of support may be empty)


def test_overview_periods_are_exact_at_any_minute(tmp_path: Path) -> None:
    """Today, yesterday, month to date and the same stretch of last month, at a `now` off the hour,
    equal the ledger's sums: whole hours come from the rollup, the partial ones from events."""
    url = f"sqlite:///{tmp_path}/p.db"
    rows = list(events(3000, datetime(2026, 10, 1, tzinfo=UTC), 51, seed=9))

    async def write() -> None:
        st = open_store(url)
        await st.open()
        await st.write_events(rows)
        await st.close()

    asyncio.run(write())
    wh = Warehouse(url)
    wh.refresh_blocking()
    now = datetime(2026, 11, 20, 13, 37, 11, tzinfo=UTC)
    ov = q.overview(wh, Filter(since=now - timedelta(days=30), until=now, team="legal"), now)

    def spent(a: datetime, b: datetime) -> Decimal:
        return sum((Decimal(r["cost_usd"]) for r in rows if r["team"] == "legal"
                    and a <= datetime.fromisoformat(r["ts_start"]) < b), Decimal(0))

    day0 = datetime(2026, 11, 20, tzinfo=UTC)
    assert Decimal(ov["spend_today_usd"]) == spent(day0, now)
    assert Decimal(ov["spend_yesterday_usd"]) == spent(day0 - timedelta(days=1), day0)
    assert Decimal(ov["spend_month_to_date_usd"]) == spent(datetime(2026, 11, 1, tzinfo=UTC), now)
    assert Decimal(ov["spend_last_month_same_days_usd"]) == spent(datetime(2026, 10, 1, tzinfo=UTC),
                                                                  datetime(2026, 10, 20, 13, 37, 11, tzinfo=UTC))
    assert Decimal(ov["cost_usd"]) == spent(now - timedelta(days=30), now)
    assert ov["requests"] == sum(1 for r in rows if r["team"] == "legal"
                                 and now - timedelta(days=30) <= datetime.fromisoformat(r["ts_start"]) < now)
    wh.close()


@pytest.fixture(params=BACKENDS)
def any_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    yield from fresh_ledger(request.param, tmp_path, "s.db")


async def test_rows_read_again_or_late_are_counted_once(any_url: str) -> None:
    """Late rows (old timestamps and ids), ids that are not time-ordered (the batch lane's uuid5),
    and a whole ledger read a second time: every event once, the rollup equal to the events."""
    store = open_store(any_url)
    await store.open()
    rows = list(events(600, T0, 10, seed=4))
    await store.write_events(rows[:400])
    wh = Warehouse(any_url, page_size=128)
    await wh.refresh(store)
    _rollup_equals_events(wh)
    rng = random.Random(8)
    acts = [{"action": "block", "budgets": ["legal-monthly", "org-daily"]}, {"action": "defer", "budget": "legal-lo"}]
    batch = [{**event_row(rng, NOW - timedelta(days=15, minutes=i), "legal"), "actions": orjson.dumps(acts).decode(),
              "event_id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"item-{i}"))} for i in range(30)]
    await store.write_events([*rows[350:], *batch])  # a spool replay: 50 already stored, old timestamps
    stats = await wh.refresh(store)
    assert stats.events == 230
    _rollup_equals_events(wh)
    wh._set_meta("pos:events", "0")  # as if positions went back: the whole ledger is read again
    assert (await wh.refresh(store)).events == 0
    _rollup_equals_events(wh)
    total = sum(Decimal(r["cost_usd"]) for r in [*rows, *batch])
    assert wh.query("SELECT sum(cost_usd) AS s FROM hourly")[0]["s"] == total
    assert wh.counts()["events"] == 630 and wh.counts()["budget_acts"] >= 90
    got = {(x["budget"], x["action"]): x["count"] for x in act.budget_actions(wh, Filter(team="legal"), T0)}
    assert got[("legal-monthly", "block")] == got[("org-daily", "block")] == got[("legal-lo", "defer")] == 30
    # each budget counted from its own start
    mid = NOW - timedelta(days=15, minutes=10)  # the batch rows are 1 minute apart, the newest at NOW - 15 days
    only = act.budget_actions(wh, Filter(team="legal"), T0, {"legal-lo": mid, "org-daily": T0})
    assert {(x["budget"], x["action"]): x["count"] for x in only} == {("legal-lo", "defer"): 11,
                                                                      ("org-daily", "block"): 30}
    wh.close()
    await store.close()


def test_a_version_5_file_gets_its_rollup_without_a_new_copy(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/l.db"
    build_ledger(url, n=800, outcomes=False)
    path = tmp_path / "wh.duckdb"
    wh = Warehouse(url, path)
    wh.refresh_blocking()
    wh.con.execute("DROP TABLE hourly")
    wh._set_meta("schema", "5")  # the layout before the rollup
    wh.close()
    wh = Warehouse(url, path)
    assert wh.counts()["events"] == 800 and wh.refresh_blocking().events == 0
    _rollup_equals_events(wh)
    wh.close()
