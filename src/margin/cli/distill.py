"""`margin distill export | plan`: from a workflow's recorded strong-model traffic to a fine-tuning
dataset, and what a distilled student would cost against the teacher.

    margin distill export --workflow W --since 30d --out W.jsonl [--model TEACHER] [--successful-runs]
    margin distill plan --workflow W --since 30d --student llama-3.1-8b --gpu l4 --precision int4 [--trace-out T]

The dataset is OpenAI's chat fine-tuning JSONL (analytics/distill.py), secrets redacted by the
gateway's payload redactor; the plan prices the student with the planner (planner/distill.py) and
names the migration check (`margin replay --candidate`) that must pass before switching."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import typer

from margin.cli.common import CONFIG_OPT, config_or_exit, console, fail, print_json, print_table, since_or_exit

app = typer.Typer(help="Distillation: a fine-tuning dataset from a workflow's recorded traffic, and the economics "
                       "of a student model against the teacher.", no_args_is_help=True)
SINCE_OPT = typer.Option("30d", "--since", help="30m, 24h, 7d, 2w or an ISO date")
WORKFLOW_OPT = typer.Option(..., "--workflow", "-w", help="the workflow (X-Margin-Workflow or the workflow tag)")
MODEL_OPT = typer.Option(None, "--model", help="the teacher (default: the model the workflow spent most on)")


def _read(url: str, start: datetime, outcomes: bool) -> tuple[list[dict[str, Any]], dict[str, Any], list[Any] | None]:
    from margin.ledger import open_store

    async def run() -> tuple[list[dict[str, Any]], dict[str, Any], list[Any] | None]:
        store = open_store(url)
        await store.open()
        try:
            rows = await store.fetch_events(since=start)
            outs = await store.fetch_outcomes() if outcomes else None
            return rows, await store.fetch_payloads(since=start), outs
        finally:
            await store.close()

    try:
        return asyncio.run(run())
    except Exception as e:
        fail(f"cannot read the ledger at {url}: {type(e).__name__}: {e}", 1)
        raise


def _check_workflow(rows: list[dict[str, Any]], workflow: str, start: datetime, url: str) -> None:
    from margin.analytics.distill import workflow_of

    if any(workflow_of(r) == workflow for r in rows):
        return
    known = Counter(w for w in (workflow_of(r) for r in rows) if w)
    hint = f"; workflows seen: {', '.join(w for w, _ in known.most_common(8))}" if known else ""
    fail(f"no calls of workflow {workflow!r} since {start:%Y-%m-%d %H:%M} UTC in {url}{hint}", 1)


@app.command("export")
def export(
    workflow: str = WORKFLOW_OPT,
    out: Path = typer.Option(..., "--out", "-o", help="the training file (JSONL)"),
    since: str = SINCE_OPT,
    model: str | None = MODEL_OPT,
    successful_runs: bool = typer.Option(False, "--successful-runs", help="only runs whose outcome was success"),
    validation_out: Path | None = typer.Option(None, "--validation-out", help="also write a validation file"),
    validation_share: float = typer.Option(0.1, "--validation-share", min=0.01, max=0.5,
                                           help="share of prompts that go to the validation file"),
    config: Path = CONFIG_OPT,
    json: bool = typer.Option(False, "--json", help="machine-readable summary"),
) -> None:
    """Write the teacher's answers in the workflow as OpenAI chat fine-tuning JSONL (redacted, deduplicated)."""
    from margin.analytics.distill import build, jsonl, split
    from margin.gateway.payloads import redact_obj

    cfg = config_or_exit(config)
    start = since_or_exit(since)
    rows, payloads, outcomes = _read(cfg.ledger.url, start, successful_runs)
    _check_workflow(rows, workflow, start, cfg.ledger.url)
    ds = build(rows, payloads, workflow, redact_obj, model, outcomes)
    summary = ds.summary()
    if model and not ds.models.get(model):
        fail(f"model {model!r} answered no call of {workflow!r}; models seen: "
             f"{', '.join(m for m, _ in ds.models.most_common())}", 1)
    if not ds.examples:
        reasons = ", ".join(f"{n} {k}" for k, n in summary["skipped"].items())
        fail(f"no examples for {workflow!r} (teacher {ds.teacher}): skipped {reasons}"
             + (" - give the workflow's keys the tag log_payloads=true" if "not_logged" in summary["skipped"] else ""),
             1)
    train, valid = split(ds, validation_share) if validation_out is not None else (ds.examples, [])
    try:
        out.write_bytes(b"".join(jsonl(train)))
        if validation_out is not None:
            validation_out.write_bytes(b"".join(jsonl(valid)))
    except OSError as e:
        fail(f"cannot write the dataset: {e}", 1)
    summary.update({"since": start.isoformat(), "out": str(out), "train_rows": len(train),
                    **({"validation_out": str(validation_out), "validation_rows": len(valid)}
                       if validation_out is not None else {})})
    if json:
        print_json(summary)
        return
    console.print(f"wrote {len(train)} examples to {out}" + (f" and {len(valid)} to {validation_out}"
                                                              if validation_out is not None else "")
                  + f": {workflow} answered by {ds.teacher}, {summary['tokens']:,} metered tokens "
                  f"({summary['input_tokens']:,} in / {summary['output_tokens']:,} out)", highlight=False)
    skipped = [{"reason": k, "calls": n} for k, n in summary["skipped"].items()]
    print_table(skipped, f"left out ({summary['workflow_calls']} calls)")
    for w in summary["warnings"]:
        console.print(f"[yellow]warning:[/] {w}", highlight=False)


def traffic(rows: list[dict[str, Any]], workflow: str, model: str | None, start: datetime, now: datetime) -> Any:
    """The teacher's calls in the workflow as planner input (`planner.distill.Traffic`)."""
    from margin.analytics.distill import pick_teacher, teacher_calls
    from margin.planner.distill import Traffic

    calls = teacher_calls(rows, workflow)
    teacher = pick_teacher(calls, model)
    mine = [r for r in calls if r.get("model") == teacher]
    if not mine:
        seen = ", ".join(sorted({str(r.get("model")) for r in calls})) or "none"
        fail(f"no successful calls of {workflow!r} by {teacher or 'any model'}; models seen: {seen}", 1)
    first = min(datetime.fromisoformat(r["ts_start"]) for r in mine)
    days = max((now - max(start, first)).total_seconds() / 86400, 1 / 24)
    hours = Counter(datetime.fromisoformat(r["ts_start"]).astimezone(UTC).hour for r in mine)

    def money(r: Mapping[str, Any], *fields: str) -> Decimal:
        return sum((Decimal(str(r.get(f) or "0")) for f in fields), Decimal(0))

    return Traffic(
        model=str(teacher), calls=len(mine), days=days, spend_usd=sum((money(r, "cost_usd") for r in mine), Decimal(0)),
        input_tokens=tuple(int(r.get("input_tokens") or 0) for r in mine),
        output_tokens=tuple(int(r.get("output_tokens") or 0) for r in mine),
        cached_input_tokens=sum(int(r.get("cached_input_tokens") or 0) for r in mine),
        input_usd=sum((money(r, "cost_input_usd", "cost_cache_read_usd", "cost_cache_write_usd") for r in mine),
                      Decimal(0)),
        output_usd=sum((money(r, "cost_output_usd") for r in mine), Decimal(0)),
        hourly_calls=tuple(hours.get(h, 0) for h in range(24)))


@app.command("plan")
def plan(
    workflow: str = WORKFLOW_OPT,
    student: str = typer.Option("llama-3.1-8b", "--student", help="planner catalogue model (`margin plan models`)"),
    gpu: str = typer.Option("l4", "--gpu", help="planner catalogue accelerator (`margin plan gpus`)"),
    precision: str = typer.Option("int4", "--precision", help="bf16 | fp8 | int8 | int4 weights"),
    tp: int = typer.Option(1, "--tp", help="tensor-parallel GPUs per replica"),
    since: str = SINCE_OPT,
    model: str | None = MODEL_OPT,
    ttft_slo: float = typer.Option(1.0, "--ttft-slo", help="seconds"),
    tpot_slo: float = typer.Option(0.05, "--tpot-slo", help="seconds per output token"),
    min_replicas: int = typer.Option(1, "--min-replicas", min=0),
    autoscale: bool = typer.Option(False, "--autoscale", help="replicas follow the hourly load (rented GPUs)"),
    usd_per_gpu_hour: str | None = typer.Option(None, "--usd-per-gpu-hour", help="override the catalogue price"),
    burst: float = typer.Option(1.0, "--burst", min=1.0, help="busiest minute over the hour's mean rate"),
    fine_tune_usd: str | None = typer.Option(None, "--fine-tune-usd", help="one-off fine-tuning cost (a quote)"),
    epochs: float = typer.Option(3.0, "--epochs", min=0.1, help="for the fine-tuning estimate"),
    train_gpu: str = typer.Option("h100-sxm", "--train-gpu", help="for the fine-tuning estimate"),
    trace_out: Path | None = typer.Option(None, "--trace-out", help="write the workflow's trace for the migration "
                                                                    "check (margin replay --candidate)"),
    candidate: str | None = typer.Option(None, "--candidate", help="the student's model name in margin.yaml"),
    gateway: str = typer.Option("http://127.0.0.1:4000/v1", "--gateway", help="for the migration-check command"),
    config: Path = CONFIG_OPT,
    json: bool = typer.Option(False, "--json"),
) -> None:
    """Price a fine-tuned student (size, quantisation, GPU) against the workflow's metered teacher."""
    from margin.planner.distill import DistillError, FineTune, Student
    from margin.planner.distill import plan as make_plan

    cfg = config_or_exit(config)
    start = since_or_exit(since)
    prices = {name: _dollars(name, text) for name, text in (("--usd-per-gpu-hour", usd_per_gpu_hour),
                                                             ("--fine-tune-usd", fine_tune_usd))}
    rows, payloads, _ = _read(cfg.ledger.url, start, False)
    _check_workflow(rows, workflow, start, cfg.ledger.url)
    t = traffic(rows, workflow, model, start, datetime.now(UTC))
    s = Student(student, gpu, precision, tp, ttft_slo_s=ttft_slo, tpot_slo_s=tpot_slo, min_replicas=min_replicas,
                autoscale=autoscale, usd_per_gpu_hour=prices["--usd-per-gpu-hour"], burst=burst)
    try:
        result = make_plan(t, s, FineTune(prices["--fine-tune-usd"], epochs, train_gpu),
                           sum(t.input_tokens) + sum(t.output_tokens))
    except DistillError as e:
        fail(str(e))
        raise
    trace = trace_out or Path(f"{workflow}.trace.jsonl")
    if trace_out is not None:
        _write_trace(rows, payloads, workflow, t.model, start, trace_out, cfg.ledger.url)
    name = candidate or f"{workflow}-student"
    result["workflow"] = workflow
    result["validation"] = {
        "trace": str(trace) if trace_out is not None else None,
        "steps": [
            f"margin distill export --workflow {workflow} --since {since} --model {t.model} --out {workflow}.jsonl "
            f"--validation-out {workflow}.valid.jsonl",
            f"fine-tune {student} on {workflow}.jsonl, serve it ({precision} on {gpu}: vLLM, TGI or llama.cpp "
            f"server) and add it to margin.yaml as model {name!r}",
            *([] if trace_out is not None else
              [f"margin distill plan --workflow {workflow} --since {since} --model {t.model} --trace-out {trace}"]),
            f"margin replay {trace} --policy margin.yaml --candidate {name} --replace {t.model} --gateway {gateway} "
            f"--key $MARGIN_KEY --scorer judge:{t.model} --sample 50",
            "switch the workflow's route to the student only if the migration check's agreement is acceptable"]}
    if json:
        print_json(result)
        return
    _print_plan(result)


def _dollars(option: str, text: str | None) -> Decimal | None:
    if text is None:
        return None
    try:
        v = Decimal(text)
    except ArithmeticError:
        v = Decimal("NaN")
    if not v.is_finite() or v < 0:
        fail(f"{option} {text!r}: give a number of dollars >= 0, e.g. 0.80")
    return v


def _write_trace(rows: list[dict[str, Any]], payloads: dict[str, Any], workflow: str, teacher: str,
                 start: datetime, out: Path, url: str) -> None:
    from margin.analytics.distill import workflow_of
    from margin.replay.export import trace_lines

    mine = [r for r in rows if workflow_of(r) == workflow and r.get("model") == teacher]
    try:
        with out.open("wb") as f:
            for line in trace_lines(mine, payloads, start, f"ledger {url}, workflow {workflow}, model {teacher}"):
                f.write(line)
    except OSError as e:
        fail(f"cannot write {out}: {e}", 1)


def _usd(v: Any) -> str:
    if v is None:
        return "-"
    d = Decimal(v)
    return f"{'-' if d < 0 else ''}${abs(d):,.2f}"


def _print_plan(r: dict[str, Any]) -> None:
    t, s = r["teacher"], r["student"]
    console.print(f"[bold]{r['workflow']}[/]: {t['calls']:,} calls of {t['model']} over {t['days']:g} days "
                  f"({t['calls_per_day']:,} per day), {t['input_tokens_mean']:,.0f} in / "
                  f"{t['output_tokens_mean']:,.0f} out tokens per call, metered ${Decimal(t['metered_usd']):,.4f}",
                  highlight=False)
    print_table([
        {"": "teacher (metered)", "model": t["model"], "per month": _usd(t["monthly_usd"]),
         "per call": t["usd_per_call"], "replicas": "-", "p99 TTFT s": "-", "p99 TPOT s": "-"},
        {"": "student (planner)", "model": f"{s['model']} {s['precision']} on {s['gpus']} x {s['gpu']}",
         "per month": _usd(s["monthly_usd"]), "per call": s["usd_per_call"], "replicas": s["replicas"],
         "p99 TTFT s": s["p99_ttft_s"], "p99 TPOT s": s["p99_tpot_s"]},
    ], "teacher against student (a month is 30 days)")
    print_table([{"precision": a["precision"], "per month": _usd(a.get("monthly_usd")),
                  "replicas": a.get("replicas", "-"), "note": a.get("unavailable", "")} for a in r["alternatives"]],
                f"{s['model']} on {s['gpu']} at other precisions")
    ft = r["fine_tune"]
    console.print(f"fine-tuning (one-off): {_usd(ft['usd'])} - {ft['source']}", highlight=False)
    be = r["break_even_volume"]
    months = r["break_even_months"]
    console.print(f"monthly saving: {_usd(r['monthly_saving_usd'])}; fine-tuning pays back "
                  + ("never at this volume" if months is None else f"in {months} months")
                  + (f"; costs cross at about {be['calls_per_day']:,} calls/day ({be['cheaper_above']} cheaper above)"
                     if be else ""), highlight=False)
    console.print(f"[bold]{r['verdict']}[/]", highlight=False)
    console.print("validate the student before switching:", highlight=False)
    for i, step in enumerate(r["validation"]["steps"], 1):
        console.print(f"  {i}. {step}", highlight=False, soft_wrap=True)
