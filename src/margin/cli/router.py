"""`margin router train|eval`: fit the learned router on a routing data set and save it as an
artefact, or measure it (cost-quality curve, AIQ, APGR/CPT, cost ratio at 95%/100% of the
strongest model's quality, decision latency) on held-out data or by cross-validation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from margin.cli.common import console, fail, print_json, print_table

app = typer.Typer(help="The learned router: train an artefact, evaluate on routing data.", no_args_is_help=True)

FORMAT_OPT = typer.Option(..., "--format", "-f", help="routellm | dc | routerbench")
TRAIN_OPT = typer.Option(..., "--train", help="Training data: files or directories (repeat or comma-separate)")
STRONG_OPT = typer.Option(None, "--strong", help="Reference (strongest) model; default: best on training data")
ROUTER_OPT = typer.Option("tfidf-lr", "--router", help="Router kind: tfidf-lr")
CALIB_OPT = typer.Option(0.2, "--calib-frac", help="With --calibration split: share of training data held out")
CALIBRATION_OPT = typer.Option("crossfit", "--calibration",
                               help="How the operating point is chosen: crossfit (out-of-fold scores of all training "
                                    "rows, 5 folds) or split (one --calib-frac hold-out)")
SEED_OPT = typer.Option(0, "--seed")


def _paths(values: list[str]) -> list[Path]:
    out = [Path(p.strip()) for v in values for p in v.split(",") if p.strip()]
    for p in out:
        if not p.exists():
            fail(f"no such file or directory: {p}")
    return out


def _load(fmt: str, values: list[str]) -> Any:
    from margin.router import data

    if fmt not in data.FORMATS:
        fail(f"unknown --format {fmt!r} (one of {', '.join(data.FORMATS)})")
    try:
        return data.load(fmt, _paths(values))
    except (OSError, KeyError, ValueError) as e:
        fail(f"cannot load {fmt} data: {e}")
        raise


def _default_strong(fmt: str, strong: str | None) -> str | None:
    from margin.router import data

    return data.STRONG if strong is None and fmt == "routellm" else strong


def _check_calibration(calibration: str) -> None:
    from margin.router import train as T

    if calibration not in T.CALIBRATIONS:
        fail(f"unknown --calibration {calibration!r} (one of {', '.join(T.CALIBRATIONS)})")


def _calib_words(calibration: str, calib_frac: float) -> str:
    return "5-fold cross-fitting" if calibration == "crossfit" else f"a {calib_frac:.0%} calibration split"


def _r(x: Any, nd: int = 4) -> Any:
    return round(x, nd) if isinstance(x, float) else x


def _print_report(res: dict[str, Any], title: str) -> None:
    rows: list[dict[str, Any]] = []
    strong = res["strongest"]
    s_cost = res["per_model"][strong]["mean_cost"]
    for m, v in sorted(res["per_model"].items(), key=lambda kv: kv[1]["mean_cost"]):
        rows.append({"policy": m + (" (strongest)" if m == strong else ""), "quality": _r(v["quality"]),
                     "mean_cost_usd": f"{v['mean_cost']:.3e}", "cost_ratio": _r(s_cost / v["mean_cost"], 2)})
    orc = res["oracle"]
    rows.append({"policy": "oracle (cheapest correct)", "quality": _r(orc["quality"]),
                 "mean_cost_usd": f"{orc['mean_cost']:.3e}", "cost_ratio": _r(orc["cost_ratio"], 2)})
    for tag in ("95", "100"):
        if f"quality_at_{tag}" in res:
            rows.append({"policy": f"router @ {tag}% of strongest (op. point from calibration)",
                         "quality": _r(res[f"quality_at_{tag}"]), "mean_cost_usd": f"{res[f'mean_cost_at_{tag}']:.3e}",
                         "cost_ratio": _r(res[f"cost_ratio_at_{tag}"], 2)})
    print_table(rows, title=title)
    head: dict[str, Any] = {k: _r(res[k]) for k in ("aiq", "apgr", "cpt50", "cpt80", "pct_strong_at_95") if k in res}
    lat = res.get("decision_latency_ms")
    if lat:
        head["latency_p50_ms"], head["latency_p99_ms"] = lat["p50"], lat["p99"]
    console.print("  ".join(f"[bold]{k}[/]={v}" for k, v in head.items()), highlight=False)


def plot(res: dict[str, Any], out: Path, title: str) -> Path:
    """Cost-quality curve of the router with the single models and the oracle (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    two = "strong_share_curve" in res
    fig, axes = plt.subplots(1, 2 if two else 1, figsize=(12 if two else 6.5, 4.6), squeeze=False)
    ax = axes[0][0]
    curve = sorted(res["curve"], key=lambda p: p["mean_cost"])
    ax.plot([p["mean_cost"] for p in curve], [p["quality"] for p in curve], "-", color="C0", lw=2,
            label=f"learned router (AIQ {res['aiq']:.3f})")
    for i, (m, v) in enumerate(sorted(res["per_model"].items())):
        ax.scatter([v["mean_cost"]], [v["quality"]], marker="o", s=30, color=f"C{(i + 2) % 10}", label=m, zorder=3)
    ax.scatter([res["oracle"]["mean_cost"]], [res["oracle"]["quality"]], marker="*", s=150, color="gold",
               edgecolor="k", label="oracle", zorder=4)
    if "mean_cost_at_95" in res:
        ax.scatter([res["mean_cost_at_95"]], [res["quality_at_95"]], marker="D", s=50, color="C1", zorder=5,
                   label=f"router @95% ({res['cost_ratio_at_95']:.2f}x cheaper)")
    ax.set_xscale("log")
    ax.set_xlabel("mean cost per query (USD, log)")
    ax.set_ylabel("quality (share correct)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    if two:
        ax2 = axes[0][1]
        xs = [p["pct_strong"] for p in res["strong_share_curve"]]
        ax2.plot(xs, [p["quality"] for p in res["strong_share_curve"]], color="C0", lw=2,
                 label=f"learned router (APGR {res['apgr']:.3f})")
        weak = next(m for m in res["per_model"] if m != res["strongest"])
        qw, qs = res["per_model"][weak]["quality"], res["per_model"][res["strongest"]]["quality"]
        ax2.plot([0, 100], [qw, qs], "--", color="grey", label="random routing (APGR 0.5)")
        ax2.axhline(qw + 0.8 * (qs - qw), color="C3", lw=0.8, ls=":", label="80% of the gap (CPT80)")
        ax2.axhline(0.95 * qs, color="C1", lw=0.8, ls=":", label="95% of strongest quality")
        ax2.set_xlabel("% calls to strong model")
        ax2.set_ylabel("quality")
        ax2.set_title(title + ": quality vs % strong calls")
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


@app.command("eval")
def eval_cmd(
    fmt: str = FORMAT_OPT,
    train: list[str] = TRAIN_OPT,
    test: list[str] = typer.Option(None, "--test", help="Test data; omit for K-fold cross-validation over --train"),
    strong: str | None = STRONG_OPT,
    router: str = ROUTER_OPT,
    folds: int = typer.Option(5, "--folds", help="Cross-validation folds when --test is omitted"),
    calib_frac: float = CALIB_OPT,
    calibration: str = CALIBRATION_OPT,
    seed: int = SEED_OPT,
    latency_n: int = typer.Option(1000, "--latency-n", help="Single-prompt decisions timed for the latency"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table"),
    png: Path | None = typer.Option(None, "--png", help="Write the cost-quality plot into this directory"),
    name: str | None = typer.Option(None, "--name", help="Data set name for the title and PNG file"),
) -> None:
    """Measure the router: per-model and oracle quality/cost, curve, AIQ, APGR/CPT, cost ratios, latency."""
    from margin.router import train as T

    if router not in T.ROUTERS:
        fail(f"unknown --router {router!r} (one of {', '.join(T.ROUTERS)})")
    _check_calibration(calibration)
    tr = _load(fmt, train)
    strong = _default_strong(fmt, strong)
    kw: dict[str, Any] = {"kind": router, "strong": strong, "calib_frac": calib_frac, "calibration": calibration}
    try:
        if test:
            res = T.evaluate(tr, _load(fmt, test), seed=seed, latency_n=latency_n, **kw)
            res["protocol"] = f"train/test, operating point from {_calib_words(calibration, calib_frac)}"
        else:
            res = T.cross_validate(tr, folds=folds, seed=seed, latency_n=latency_n, **kw)
            res["protocol"] = (f"{folds}-fold CV over prompts, operating point from "
                               f"{_calib_words(calibration, calib_frac)} of the training folds")
    except ValueError as e:
        fail(str(e))
        raise
    label = name or (Path(train[0].split(",")[0]).stem or fmt)
    res.update(format=fmt, router=router, dataset=label, data=tr.summary())
    if png is not None:
        res["png"] = str(plot(res, png / f"router_{label}.png", label))
    if as_json:
        print_json(res)
    else:
        _print_report(res, f"{label}: {res['protocol']}")


@app.command("train")
def train_cmd(
    fmt: str = FORMAT_OPT,
    train: list[str] = TRAIN_OPT,
    out: Path = typer.Option(..., "--out", help="Artefact directory to write"),
    target_quality: float = typer.Option(0.95, "--target-quality", help="Share of the strongest model's quality"),
    strong: str | None = STRONG_OPT,
    router: str = ROUTER_OPT,
    calib_frac: float = CALIB_OPT,
    calibration: str = CALIBRATION_OPT,
    seed: int = SEED_OPT,
) -> None:
    """Fit on all of --train and save the artefact, the operating point chosen on calibration predictions."""
    from margin.router import artefact
    from margin.router import train as T

    if router not in T.ROUTERS:
        fail(f"unknown --router {router!r} (one of {', '.join(T.ROUTERS)})")
    _check_calibration(calibration)
    tr = _load(fmt, train)
    strong = _default_strong(fmt, strong)
    try:
        sj = T.strongest_index(tr, strong)
    except ValueError as e:
        fail(str(e))
        raise
    op = T.calibrate(tr, router, sj, [target_quality], calib_frac, seed, calibration)[target_quality]
    model = T.make_router(router, tr.models).fit(tr.prompts, tr.scores)
    cost_vec = tr.costs.mean(axis=0)
    coef = T.fit_cost_model(tr.prompts, tr.costs)
    cost_model = {m: {"fixed_usd": float(coef[0, j]), "per_input_token_usd": float(coef[1, j])}
                  for j, m in enumerate(tr.models)}
    operating_point = {"rule": "lambda", "value": op["lambda"], "cost_mode": op["cost_mode"],
                       "target_quality": target_quality,
                       "reference_model": tr.models[sj], "calibration_quality": op["quality"],
                       "calibration_reference_quality": op["calibration_reference_quality"],
                       "calibration_mean_cost": op["mean_cost"], "calibration": calibration,
                       "calib_frac": calib_frac, "seed": seed}
    path = artefact.save_router(model, out, costs={m: float(cost_vec[j]) for j, m in enumerate(tr.models)},
                                operating_point=operating_point, cost_model=cost_model,
                                training={"format": fmt, "paths": [str(p) for p in _paths(train)], **tr.summary()})
    console.print(f"wrote {path}: {len(tr)} rows, models {', '.join(tr.models)}, lambda={op['lambda']:.4g} "
                  f"({op['cost_mode']} costs) "
                  f"(calibration quality {op['quality']:.4f} vs {tr.models[sj]} "
                  f"{op['calibration_reference_quality']:.4f}, target {target_quality:.0%})", highlight=False)


def _print_cascade(res: dict[str, Any], title: str) -> None:
    rows: list[dict[str, Any]] = []
    s_cost = res["per_model"][res["strong"]]["mean_cost"]
    for m, v in sorted(res["per_model"].items(), key=lambda kv: kv[1]["mean_cost"]):
        rows.append({"policy": m, "quality": _r(v["quality"]), "mean_cost_usd": f"{v['mean_cost']:.3e}",
                     "cost_ratio": _r(s_cost / v["mean_cost"], 2), "escalated": ""})
    orc = res["oracle"]
    rows.append({"policy": "oracle cascade (escalate exactly the cheap misses)", "quality": _r(orc["quality"]),
                 "mean_cost_usd": f"{orc['mean_cost']:.3e}", "cost_ratio": _r(orc["cost_ratio"], 2), "escalated": ""})
    for tag in ("95", "100"):
        if f"quality_at_{tag}" in res:
            rows.append({"policy": f"cascade @ {tag}% of strong (threshold from calibration)",
                         "quality": _r(res[f"quality_at_{tag}"]), "mean_cost_usd": f"{res[f'mean_cost_at_{tag}']:.3e}",
                         "cost_ratio": _r(res[f"cost_ratio_at_{tag}"], 2),
                         "escalated": f"{res[f'escalated_at_{tag}']:.1%}"})
    print_table(rows, title=title)
    head: dict[str, Any] = {k: _r(res[k]) for k in ("aiq", "verifier_auc") if res.get(k) is not None}
    lat = res.get("decision_latency_ms")
    if lat:
        head["latency_p50_ms"], head["latency_p99_ms"] = lat["p50"], lat["p99"]
    console.print("  ".join(f"[bold]{k}[/]={v}" for k, v in head.items()), highlight=False)


CHEAP_OPT = typer.Option(None, "--cheap", help="The model answering first; default: cheapest by mean cost")


def plot_cascade(res: dict[str, Any], out: Path, title: str) -> Path:
    """Cost-quality curve of the cascade over its thresholds, with the single models and the oracle."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.6))
    curve = sorted(res["curve"], key=lambda p: p["mean_cost"])
    ax.plot([p["mean_cost"] for p in curve], [p["quality"] for p in curve], "-", color="C0", lw=2,
            label=f"cascade + learned verifier (AIQ {res['aiq']:.3f})")
    for i, (m, v) in enumerate(sorted(res["per_model"].items())):
        ax.scatter([v["mean_cost"]], [v["quality"]], s=30, color=f"C{i + 2}", label=m, zorder=3)
    ax.scatter([res["oracle"]["mean_cost"]], [res["oracle"]["quality"]], marker="*", s=150, color="gold",
               edgecolor="k", label="oracle cascade", zorder=4)
    ax.scatter([res["mean_cost_at_95"]], [res["quality_at_95"]], marker="D", s=50, color="C1", zorder=5,
               label=f"cascade @95% ({res['cost_ratio_at_95']:.2f}x cheaper, {res['escalated_at_95']:.0%} escalated)")
    ax.set_xscale("log")
    ax.set_xlabel("mean cost per query, both calls (USD, log)")
    ax.set_ylabel("quality (share correct)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


@app.command("cascade-eval")
def cascade_eval_cmd(
    fmt: str = FORMAT_OPT,
    train: list[str] = TRAIN_OPT,
    test: list[str] = typer.Option(None, "--test", help="Test data; omit for K-fold cross-validation over --train"),
    strong: str | None = STRONG_OPT,
    cheap: str | None = CHEAP_OPT,
    folds: int = typer.Option(5, "--folds", help="Cross-validation folds when --test is omitted"),
    seed: int = SEED_OPT,
    latency_n: int = typer.Option(1000, "--latency-n", help="Single verifications timed for the latency"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table"),
    png: Path | None = typer.Option(None, "--png", help="Write the cost-quality plot into this directory"),
    name: str | None = typer.Option(None, "--name", help="Data set name for the title and PNG file"),
) -> None:
    """Measure a learned cascade (cheap model, then a verifier on its answer, then the strong model):
    quality, cost with both calls counted, escalation rate, verifier AUC, latency. Needs data with
    the cheap model's answers (RouteLLM gsm8k_responses.csv)."""
    from margin.router import cascade_eval as CE
    from margin.router.verifier import VerifierError

    tr = _load(fmt, train)
    kw: dict[str, Any] = {"strong": _default_strong(fmt, strong), "cheap": cheap}
    try:
        if test:
            res = CE.evaluate(tr, _load(fmt, test), seed=seed, latency_n=latency_n, **kw)
            res["protocol"] = "train/test, threshold from 5-fold cross-fitting on train"
        else:
            res = CE.cross_validate(tr, folds=folds, seed=seed, latency_n=latency_n, **kw)
            res["protocol"] = f"{folds}-fold CV over prompts, threshold from 5-fold cross-fitting of the training folds"
    except (ValueError, VerifierError) as e:
        fail(str(e))
        raise
    label = name or (Path(train[0].split(",")[0]).stem or fmt)
    res.update(format=fmt, router="cascade-verifier", dataset=label, data=tr.summary())
    if png is not None:
        res["png"] = str(plot_cascade(res, png / f"router_{label}_cascade.png", f"{label}: cascade"))
    if as_json:
        print_json(res)
    else:
        _print_cascade(res, f"cascade {res['cheap']} -> {res['strong']}: {res['protocol']}")


@app.command("cascade-train")
def cascade_train_cmd(
    fmt: str = FORMAT_OPT,
    train: list[str] = TRAIN_OPT,
    out: Path = typer.Option(..., "--out", help="Verifier artefact directory to write"),
    target_quality: float = typer.Option(0.95, "--target-quality", help="Share of the strong model's quality"),
    strong: str | None = STRONG_OPT,
    cheap: str | None = CHEAP_OPT,
    seed: int = SEED_OPT,
) -> None:
    """Fit the cascade verifier on all of --train and save it, with the escalation threshold chosen on
    out-of-fold scores for --target-quality."""
    from margin.router import cascade_eval as CE
    from margin.router.verifier import VerifierError, save_verifier

    if not 0 < target_quality <= 1.5:
        fail(f"--target-quality must be in (0, 1.5], got {target_quality}")
    tr = _load(fmt, train)
    try:
        cj, sj = CE.pair(tr, _default_strong(fmt, strong), cheap)
        op = CE.calibrate(tr, cj, sj, [target_quality], seed)[target_quality]
        model = CE.fit(tr, cj, sj)
    except (ValueError, VerifierError) as e:
        fail(str(e))
        raise
    operating_point = {"rule": "gain_threshold", "value": op["threshold"], "target_quality": target_quality,
                       "calibration_quality": op["quality"], "calibration_mean_cost": op["mean_cost"],
                       "calibration_escalated": op["escalated"],
                       "calibration_reference_quality": op["calibration_reference_quality"],
                       "calibration": "crossfit", "seed": seed}
    costs = {m: float(tr.costs[:, j].mean()) for j, m in enumerate(tr.models)}
    summary = {k: v for k, v in tr.summary().items()}
    path = save_verifier(model, out, operating_point=operating_point, costs=costs,
                         training={"format": fmt, "paths": [str(p) for p in _paths(train)], **summary})
    console.print(f"wrote {path}: {len(tr)} rows, {tr.models[cj]} -> {tr.models[sj]}, escalate when "
                  f"gain > {op['threshold']:+.3f} (calibration: quality {op['quality']:.4f} vs "
                  f"{op['calibration_reference_quality']:.4f}, {op['escalated']:.1%} escalated)", highlight=False)
