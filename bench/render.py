"""Output of the overhead benchmark: the terminal table, the Markdown section (tables and a
generated reading) and the results JSON."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from common import LITELLM_VERSION, TARGET_ORDER, by_level, console, level_key
from rich.table import Table

MARK_START = "<!-- overhead:start -->"
MARK_END = "<!-- overhead:end -->"


def fmt_ms(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.2f}" if abs(x) < 10 else f"{x:.1f}" if abs(x) < 100 else f"{x:.0f}"


def fmt_added(x: float | None) -> str:
    if x is None or math.isnan(x):
        return "-"
    return ("+" if x >= 0 else "") + fmt_ms(x)


def fmt_span(xs: Sequence[float]) -> str:
    lo, hi = min(xs), max(xs)
    return fmt_ms(lo) if fmt_ms(lo) == fmt_ms(hi) else f"{fmt_ms(lo)}-{fmt_ms(hi)}"


def fmt_ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f}×"


def fmt_sustained(m: dict[str, Any]) -> str:
    if m["max_sustained_rps"] is None:
        return f"< {m['lowest_tested_rps']:g} RPS (failed at every level tried)"
    s = f"{m['max_sustained_rps']:g} RPS"
    if m["lower_bound_only"]:
        return f">= {s} (the highest level tried)"
    nxt = m.get("next_failed_rps")
    return f"{s} (failed at {nxt:g})" if nxt is not None else s


def _level_rows(rps_key: str, by_target: dict[str, Any], no: str) -> Iterator[list[str]]:
    """The results-table cells of one level, a row per target; `no` marks a level not sustained."""
    for name in TARGET_ORDER:
        s = by_target.get(name)
        if s is None:
            continue
        yield [
            rps_key,
            name,
            f"{s['achieved_rps']:.0f}",
            *(fmt_ms(s[k]) for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms")),
            f"{s['errors']}" + (f" ({100 * s['error_rate']:.2f}%)" if s["errors"] else ""),
            fmt_added(s.get("added_p50_ms")),
            fmt_added(s.get("added_p99_ms")),
            f"{s['cpu_ms_per_req']:.2f}",
            "yes" if s["sustained"] else no,
        ]


def terminal_table(doc: dict[str, Any]) -> Table:
    t = Table(title="margin overhead: open-loop, non-streaming chat, mock upstream", show_lines=False)
    for col in ("RPS", "target", "achieved", "p50", "p90", "p99", "max", "errors", "+p50", "+p99", "CPU ms/req", "ok?"):
        t.add_column(col, justify="left" if col == "target" else "right")
    for rps_key, by_target in by_level(doc["results"]):
        for cells in _level_rows(rps_key, by_target, no="[red]no[/red]"):
            t.add_row(*cells)
        t.add_section()
    return t


def markdown_tables(doc: dict[str, Any]) -> str:
    lines = [
        "| RPS | target | achieved RPS | p50 ms | p90 ms | p99 ms | max ms | errors | added p50 | added p99 "
        "| server CPU ms/req | sustained |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for rps_key, by_target in by_level(doc["results"]):
        lines += ["| " + " | ".join(cells) + " |" for cells in _level_rows(rps_key, by_target, no="no")]
    if any(r.get("litellm_added_p50_ms") is not None for r in doc["added"]):
        lines += [
            "",
            "| RPS | margin added p50 / p99 ms | LiteLLM added p50 / p99 ms | LiteLLM ÷ margin (p50 / p99) |",
            "|---:|---:|---:|---:|",
        ]
        for r in doc["added"]:
            lines.append(
                f"| {r['rps']:g} "
                f"| {fmt_added(r['margin_added_p50_ms'])} / {fmt_added(r['margin_added_p99_ms'])} "
                f"| {fmt_added(r['litellm_added_p50_ms'])} / {fmt_added(r['litellm_added_p99_ms'])} "
                f"| {fmt_ratio(r['litellm_over_margin_p50'])} / {fmt_ratio(r['litellm_over_margin_p99'])} |"
            )
    lines += ["", "Max sustained RPS (achieved >= 95% of target, errors < 0.1%, p99 < 100 ms):"]
    for name, m in doc["max_sustained"].items():
        lines.append(f"- {name}: {fmt_sustained(m)}")
    return "\n".join(lines)


def reading(doc: dict[str, Any]) -> str:
    """One paragraph, generated from the numbers (so it never disagrees with the table)."""
    parts: list[str] = []
    added = [r for r in doc["added"] if r.get("margin_added_p50_ms") is not None]
    ms = doc["max_sustained"]
    sustained_m = [r for r in added if doc["results"][level_key(r["rps"])]["margin"]["sustained"]]
    if sustained_m:
        p50s = [r["margin_added_p50_ms"] for r in sustained_m]
        p99s = [r["margin_added_p99_ms"] for r in sustained_m]
        levels = ", ".join(f"{r['rps']:g}" for r in sustained_m)
        parts.append(
            f"At the loads margin sustained ({levels} RPS) it added {fmt_span(p50s)} ms at p50 "
            f"and {fmt_span(p99s)} ms at p99 over calling the mock directly, "
            "with virtual-key auth and the SQLite ledger metering every request."
        )
    elif added:
        parts.append("margin did not meet the sustained criteria at any tested level on this run.")
    lit = [r for r in added if r.get("litellm_added_p50_ms") is not None]
    if lit:
        both = [
            r for r in lit
            if doc["results"][level_key(r["rps"])]["litellm"]["sustained"]
            and doc["results"][level_key(r["rps"])]["margin"]["sustained"]
        ]  # fmt: skip
        if both:
            r0 = both[0]
            parts.append(
                f"LiteLLM {LITELLM_VERSION} (one worker, no database, master-key auth only) added "
                f"{fmt_ms(r0['litellm_added_p50_ms'])} ms p50 / "
                f"{fmt_ms(r0['litellm_added_p99_ms'])} ms p99 at "
                f"{r0['rps']:g} RPS, {fmt_ratio(r0['litellm_over_margin_p50'])} margin's p50 overhead."
            )
    sustained = [f"{n} {fmt_sustained(ms[n])}" for n in ("margin", "litellm", "direct") if n in ms]
    parts.append("Max sustained rate (achieved >= 95%, errors < 0.1%, p99 < 100 ms): " + ", ".join(sustained) + ".")
    cpu_bits = []
    for rps_key, bt in by_level(doc["results"]):
        if "margin" in bt and ("litellm" in bt or "litellm" not in ms):
            cpu_bits = [f"{n} {bt[n]['cpu_ms_per_req']:.2f}" for n in ("margin", "litellm") if n in bt]
            cpu_at = rps_key
            break
    cpu_txt = f" (server CPU per request at {cpu_at} RPS: {', '.join(cpu_bits)} ms" if cpu_bits else ""
    top_m = ms.get("margin", {}).get("max_sustained_rps")
    if cpu_txt and top_m is not None and level_key(top_m) != cpu_at:
        cpu_txt += (
            f"; margin {doc['results'][level_key(top_m)]['margin']['cpu_ms_per_req']:.2f} ms at {top_m:g} RPS, "
            "since each event-loop wake-up (and each ledger commit) then serves several requests"
        )
    cpu_txt += ")" if cpu_txt else ""
    parts.append(
        f"The ceiling here is CPU: load generator, mock and proxies share {doc['machine']['nproc']} cores, "
        f"so a proxy's capacity follows from its CPU cost per request{cpu_txt}. Latency is measured from "
        "each request's scheduled send time, so once a target falls behind, queueing shows up in its "
        "p99 rather than as a lower offered load."
    )
    return " ".join(parts)


def update_markdown(path: Path, section: str, mark_start: str = MARK_START, mark_end: str = MARK_END) -> None:
    block = f"{mark_start}\n{section.rstrip()}\n{mark_end}"
    if path.exists():
        text = path.read_text()
        start, end = text.find(mark_start), text.find(mark_end)
        if start != -1 and end != -1 and end > start:
            text = text[:start] + block + text[end + len(mark_end) :]
        else:
            text = text.rstrip() + "\n\n" + block + "\n"
    else:
        text = f"# margin benchmarks\n\n{block}\n"
    path.write_text(text)


def markdown_section(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    s = doc["settings"]
    notes = "".join(f"\n- {n}" for n in doc["notes"] + doc.get("derived_notes", []))
    levels = ", ".join(f"{x:g}" for x in s["levels_rps"])
    steps = ", ".join(f"{x:g}" for x in s["step_up_rps"]) or "none"
    return f"""## Gateway overhead

Added latency of a non-streaming chat call through margin (virtual-key auth, pricing and the SQLite
ledger all on) versus calling the mock upstream directly, and versus a LiteLLM proxy in front of the
same mock. Open-loop load (requests scheduled every 1/RPS s; latency from the scheduled send time),
rounds interleaved direct → margin → LiteLLM; added = target percentile − direct percentile at the
same RPS.

- Command: `{doc["command"]}`
- Date: {doc["date_utc"]} (whole run {doc["wall_s"]:.0f} s)
- Machine: {m["nproc"]} CPUs, {m["cpu"]}, Python {m["python"]}, margin commit {m["margin_commit"]}
- Load: {levels} RPS (step-up: {steps}), \
{s["rounds"]} round(s) × {s["measured_s_per_round"]:g} s measured after {s["warmup_s"]:g} s warm-up, \
per target and level; LiteLLM {s["litellm"] or "not run"}
- Request: `{s["request"]}`{notes}

{markdown_tables(doc)}

{doc["reading"]}
"""


def report(doc: dict[str, Any], json_path: Path, md_path: Path | None) -> None:
    """Print the table, ratios, max sustained RPS, notes and reading; write the JSON and, if
    md_path is given, that file's overhead section."""
    console.print(terminal_table(doc))
    for r in doc["added"]:
        if r.get("litellm_added_p50_ms") is not None and r.get("margin_added_p50_ms") is not None:
            console.print(
                f"{r['rps']:>6g} RPS  LiteLLM added ÷ margin added: "
                f"p50 {fmt_ratio(r['litellm_over_margin_p50'])}"
                f"  p99 {fmt_ratio(r['litellm_over_margin_p99'])}"
            )
    for name, m in doc["max_sustained"].items():
        console.print(f"max sustained {name}: {fmt_sustained(m)}")
    for n in doc["notes"] + doc["derived_notes"]:
        console.print(f"[yellow]note:[/yellow] {n}")
    console.print(doc["reading"])

    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    console.print(f"wrote {json_path}")
    if md_path:
        update_markdown(md_path, markdown_section(doc))
        console.print(f"updated {md_path}")
