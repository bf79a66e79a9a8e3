"""`margin replay`: what a trace would have cost under a policy, how a self-hosted deployment would
serve it, and what a model migration would change. Also `export_trace` (`margin export trace`)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from margin.cli.common import (
    CONFIG_OPT,
    config_or_exit,
    console,
    err_console,
    fail,
    print_json,
    print_table,
    since_or_exit,
)

TRACE_ARG = typer.Argument(..., help="Azure 2023 CSV, Mooncake JSONL, or margin trace JSONL (margin export trace)")


@contextmanager
def _progress(show: bool) -> Iterator[Any]:
    """A rich progress bar on stderr for long traces; the engine reports (stage, done, total)."""
    if not show:
        yield None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed:,}/{task.total:,}"),
                  TimeElapsedColumn(), console=err_console, transient=True) as bar:
        tasks: dict[str, Any] = {}

        def report(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        yield report


def _scales(text: str) -> list[float]:
    try:
        out = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        fail(f"--rate-scale {text!r}: give a number or a comma list like 1,10,100")
        raise
    if not out or any(k <= 0 for k in out):
        fail(f"--rate-scale {text!r}: every scale must be > 0")
    return out


def replay_command(
    trace: Path = TRACE_ARG,
    policy: Path | None = typer.Option(None, "--policy", "-p", help="margin.yaml (+ optional replay: section)"),
    baseline: Path | None = typer.Option(None, "--baseline", help="a second policy to compare with"),
    json_out: bool = typer.Option(False, "--json", help="machine-readable output"),
    png: Path | None = typer.Option(None, "--png", help="write charts (PNG) into this directory"),
    limit: int | None = typer.Option(None, "--limit", min=1, help="only the first N requests"),
    resample: int | None = typer.Option(None, "--resample", min=2, help="N requests drawn from the trace"),
    rate_scale: str = typer.Option("1", "--rate-scale", help="replay k times faster (simulation: a list, 1,10,100)"),
    by: str | None = typer.Option(None, "--by", help="also break cost down by team, user, app, tag:<k> ..."),
    seed: int = typer.Option(0, "--seed"),
    candidate: str | None = typer.Option(None, "--candidate", help="migration: the model to switch to"),
    replace: str | None = typer.Option(None, "--replace", help="migration: switch only this model's traffic"),
    gateway: str | None = typer.Option(None, "--gateway", help="migration shadow traffic: gateway base URL (.../v1)"),
    key: str | None = typer.Option(None, "--key", envvar="MARGIN_KEY", help="virtual key for shadow traffic"),
    scorer: str = typer.Option("numeric", "--scorer", help="exact | numeric | json | regex:PAT | judge:MODEL"),
    sample: int = typer.Option(50, "--sample", min=1, help="shadow requests to send"),
    simulate: bool = typer.Option(False, "--simulate", help="simulate self-hosted serving of the trace"),
    find_replicas: bool = typer.Option(False, "--find-replicas", help="fewest replicas meeting the SLOs"),
    serve_model: str = typer.Option("llama-3.1-8b", "--serve-model", help="planner catalogue model"),
    gpu: str = typer.Option("h100-sxm", "--gpu", help="planner catalogue GPU"),
    tp: int = typer.Option(1, "--tp"),
    precision: str = typer.Option("bf16", "--precision"),
    replicas: int = typer.Option(1, "--replicas", min=1),
    ttft_slo: float | None = typer.Option(None, "--ttft-slo", help="seconds"),
    tpot_slo: float | None = typer.Option(None, "--tpot-slo", help="seconds"),
    percentile: str = typer.Option("p99", "--percentile", help="p50 | p90 | p99"),
    max_batched_tokens: int = typer.Option(8192, "--max-batched-tokens", min=1),
    max_seqs: int = typer.Option(256, "--max-seqs", min=1),
    no_prefix_cache: bool = typer.Option(False, "--no-prefix-cache"),
) -> None:
    """Replay a trace: cost under a policy (and a baseline), self-hosted serving, or a migration."""
    from margin.replay.traces import TraceError, read_trace
    from margin.replay.traces import resample as resample_trace

    try:
        tr = read_trace(trace, limit)
        if resample:
            tr = resample_trace(tr, resample, seed)
    except TraceError as e:
        fail(str(e))
        raise
    scales = _scales(rate_scale)
    if simulate or find_replicas:
        _simulation(tr, scales, json_out, png, find=find_replicas, model=serve_model, gpu=gpu, tp=tp,
                       precision=precision, replicas=replicas, ttft_slo=ttft_slo, tpot_slo=tpot_slo,
                       percentile=percentile, max_batched_tokens=max_batched_tokens, max_seqs=max_seqs,
                       prefix_cache=not no_prefix_cache)
        return
    if len(scales) != 1:
        fail("--rate-scale takes one value outside --simulate / --find-replicas")
    if scales[0] != 1:
        tr = tr.scaled(scales[0])
    if policy is None:
        fail("--policy is required (the margin.yaml to replay), unless --simulate or --find-replicas")
        raise AssertionError
    pol = _policy(policy)
    with _progress(len(tr) >= 200_000 and not json_out) as progress:
        if candidate is not None:
            _migration(tr, pol, candidate, replace, gateway, key, scorer, sample, seed, json_out, progress)
            return
        result = _run(tr, pol, progress, by)
        base = _run(tr, _policy(baseline), progress, by) if baseline else None
    from margin.replay.report import plot_replay, print_diff, print_result
    from margin.replay.summary import diff

    d = diff(result, base) if base else None
    if png:
        _need("matplotlib", "--png", "plots")
    pngs = [str(p) for p in plot_replay([result, *([base] if base else [])], png)] if png else []
    if json_out:
        print_json({"result": result, "baseline": base, "diff": d, "png": pngs})
        return
    print_result(console, result)
    if base is not None and d is not None:
        console.rule()
        print_result(console, base)
        console.rule()
        print_diff(console, d)
    for p in pngs:
        console.print(f"wrote {p}", highlight=False)


def _simulation(tr: Any, scales: list[float], json_out: bool, png: Path | None, *, find: bool, model: str, gpu: str,
                tp: int, precision: str, replicas: int, ttft_slo: float | None, tpot_slo: float | None,
                percentile: str, max_batched_tokens: int, max_seqs: int, prefix_cache: bool) -> None:
    from margin.planner.catalog import CatalogError
    from margin.planner.perf import PlannerError, deployment
    from margin.replay.sim import SimConfig, Simulator, find_replicas
    from margin.replay.simreport import plot_sim, print_sim, sim_row

    if find and ttft_slo is None and tpot_slo is None:
        fail("--find-replicas needs --ttft-slo and/or --tpot-slo")
    if png:
        _need("matplotlib", "--png", "plots")
    try:
        dep = deployment(model, gpu, tp, precision)
        cfg = SimConfig(replicas, max_batched_tokens, max_seqs, prefix_cache)
        rows, results = [], []
        for k in scales:
            t = tr.scaled(k) if k != 1 else tr
            if find:
                s = find_replicas(t, dep, cfg, ttft_slo, tpot_slo, percentile)
                res = s.tried[s.replicas] if s.replicas else s.tried[max(s.tried)]
                rows.append(sim_row(k, res, s.replicas, sorted(s.tried), s.lower_bound))
            else:
                res = Simulator(dep, cfg).run(t)
                rows.append(sim_row(k, res))
            results.append(res)
    except (PlannerError, CatalogError) as e:
        fail(str(e))
        raise
    head = {"trace": tr.summary(), "model": model, "gpu": gpu, "tp": tp, "precision": precision,
            "scheduler": {"max_batched_tokens": max_batched_tokens, "max_seqs": max_seqs, "prefix_cache": prefix_cache},
            "slo": {"ttft_s": ttft_slo, "tpot_s": tpot_slo, "percentile": percentile}}
    pngs = [str(p) for p in plot_sim(rows, results, head, png)] if png else []
    if json_out:
        print_json({**head, "runs": rows, "png": pngs})
        return
    print_sim(console, head, rows)
    for p in pngs:
        console.print(f"wrote {p}", highlight=False)


def _migration(tr: Any, pol: Any, candidate: str, replace: str | None, gateway: str | None, key: str | None,
               scorer: str, sample: int, seed: int, json_out: bool, progress: Any) -> None:
    from margin.replay.engine import replay
    from margin.replay.migrate import MigrationError, make_scorer, shadow
    from margin.replay.report import print_diff
    from margin.replay.summary import diff, summarise

    for what, name in (("--candidate", candidate), ("--replace", replace)):
        if name is not None and name not in pol.models:
            fail(f"{what} {name!r} is not a model of {pol.name} (models: {', '.join(pol.models)}); "
                 "add it with its price to price the switch")
    try:
        if not scorer.startswith("judge:"):
            make_scorer(scorer)  # a bad scorer fails before any traffic is sent
        before = summarise(replay(tr, pol, progress))
        after = summarise(replay(tr, pol, progress, force_model=candidate, force_from=replace))
        after["policy"] = f"{pol.name} with {replace or 'every model'} -> {candidate}"
        d = diff(after, before)
        checked = None
        if gateway:
            _need("openai", "--gateway", "shadow")
            if not key:
                fail("--gateway needs --key (or MARGIN_KEY): shadow traffic is metered like any other")
            checked = shadow(tr, candidate, gateway, key or "", scorer, sample, seed).to_dict()
    except (MigrationError, ValueError) as e:
        fail(str(e))
        raise
    if json_out:
        print_json({"priced": d, "current": before, "migrated": after, "shadow": checked})
        return
    print_diff(console, d)
    if checked is None:
        console.print("[dim]no --gateway: priced only; add --gateway URL --key mk-... to re-validate answers[/]")
        return
    print_table([{k: v for k, v in checked.items() if k not in ("disagreements", "first_errors")}],
                f"shadow check of {candidate} ({scorer})")
    for x in checked["disagreements"]:
        console.print(f"[dim]disagrees on request {x['request']}: reference ...{x['reference'][-60:]!r} "
                      f"answer ...{x['answer'][-60:]!r}[/]", highlight=False)


def _need(module: str, option: str, extra: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        fail(f"{option} needs {module}: pip install 'margin[{extra}]'")


def _policy(path: Path) -> Any:
    from margin.config import ConfigError
    from margin.replay.policy import load_policy

    try:
        return load_policy(path)
    except ConfigError as e:
        fail(str(e))
        raise


def _run(tr: Any, pol: Any, progress: Any, by: str | None) -> dict[str, Any]:
    from margin.config import ConfigError
    from margin.replay.engine import replay
    from margin.replay.summary import summarise

    try:
        return summarise(replay(tr, pol, progress), by)
    except (ValueError, ConfigError) as e:
        fail(str(e))
        raise


def export_trace(
    since: str = typer.Option("30d", help="30m, 24h, 7d, 2w or an ISO date"),
    out: Path = typer.Option(..., "--out", "-o", help="where to write the trace (JSONL)"),
    config: Path = CONFIG_OPT,
    json_out: bool = typer.Option(False, "--json", help="machine-readable summary"),
) -> None:
    """Write the ledger's requests since a time as a margin trace (JSONL) for `margin replay`."""
    from margin.ledger import open_store
    from margin.replay.export import keep, trace_lines

    cfg = config_or_exit(config)
    start = since_or_exit(since)

    async def fetch() -> tuple[list[dict[str, Any]], dict[str, Any]]:
        store = open_store(cfg.ledger.url)
        await store.open()
        try:
            rows = await store.fetch_events(since=start)
            return rows, await store.fetch_payloads(since=start)
        finally:
            await store.close()

    try:
        rows, payloads = asyncio.run(fetch())
    except Exception as e:
        fail(f"cannot read the ledger at {cfg.ledger.url}: {type(e).__name__}: {e}", 1)
        raise
    kept = sum(1 for r in rows if keep(r))
    try:
        with out.open("wb") as f:
            for line in trace_lines(rows, payloads, start, f"ledger {cfg.ledger.url}"):
                f.write(line)
    except OSError as e:
        fail(f"cannot write {out}: {e}", 1)
    summary = {"out": str(out), "since": start.isoformat(), "ledger_rows": len(rows), "requests": kept,
               "left_out": len(rows) - kept, "with_payloads": sum(1 for r in rows if keep(r) and
                                                                   str(r.get("event_id")) in payloads)}
    if json_out:
        print_json(summary)
    else:
        print_table([summary], f"trace written to {out}")

