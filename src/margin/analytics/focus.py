"""FinOps FOCUS 1.2 export: one row per (charge day, key attribution, provider, model, token type).

Costs are what margin metered at list price (no negotiated discounts are known to margin), so
BilledCost = EffectiveCost = ListCost = ContractedCost. Attribution (org, team, user, app, env,
key) goes in `Tags`; group-level figures (requests, runs, outcomes, money avoided) go in `x_`
columns on the group's first row only, so a SUM over the file counts each once."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from margin.analytics.outcomes import tidy
from margin.analytics.warehouse import MONEY, Warehouse

SPEC_VERSION = "1.2"
TOKEN_TYPES = (  # (key, SkuMeter, token column expression, cost column)
    ("input", "Input Tokens",
     "sum(greatest(coalesce(input_tokens, 0) - coalesce(cached_input_tokens, 0) - coalesce(cache_write_tokens, 0), 0))",
     "sum(cost_input_usd)"),
    ("cache_read", "Cache Read Input Tokens", "sum(coalesce(cached_input_tokens, 0))", "sum(cost_cache_read_usd)"),
    ("cache_write", "Cache Write Input Tokens", "sum(coalesce(cache_write_tokens, 0))", "sum(cost_cache_write_usd)"),
    ("output", "Output Tokens", "sum(coalesce(output_tokens, 0))", "sum(cost_output_usd)"),
)
PER = Decimal(1_000_000)
MONEY_COLUMNS = ("BilledCost", "EffectiveCost", "ListCost", "ContractedCost", "ListUnitPrice", "ContractedUnitPrice",
                 "PricingCurrencyContractedUnitPrice", "PricingCurrencyEffectiveCost", "PricingCurrencyListUnitPrice",
                 "x_OutcomeValueUSD", "x_AvoidedCostUSD")
NUMBER_COLUMNS = ("ConsumedQuantity", "PricingQuantity")
INT_COLUMNS = ("x_Requests", "x_Runs", "x_SuccessfulOutcomes", "x_FailedOutcomes", "x_EscalatedOutcomes")
TIME_COLUMNS = ("BillingPeriodStart", "BillingPeriodEnd", "ChargePeriodStart", "ChargePeriodEnd")
COLUMNS = (
    "BilledCost", "BillingAccountId", "BillingAccountName", "BillingAccountType", "BillingCurrency",
    "BillingPeriodEnd", "BillingPeriodStart", "ChargeCategory", "ChargeClass", "ChargeDescription", "ChargeFrequency",
    "ChargePeriodEnd", "ChargePeriodStart", "CommitmentDiscountStatus", "ConsumedQuantity", "ConsumedUnit",
    "ContractedCost", "ContractedUnitPrice", "EffectiveCost", "InvoiceId", "InvoiceIssuerName", "ListCost",
    "ListUnitPrice", "PricingCategory",
    "PricingCurrency", "PricingCurrencyContractedUnitPrice", "PricingCurrencyEffectiveCost",
    "PricingCurrencyListUnitPrice", "PricingQuantity", "PricingUnit", "ProviderName", "PublisherName",
    "ResourceId", "ResourceName", "ResourceType", "ServiceCategory", "ServiceName", "ServiceSubcategory",
    "SkuId", "SkuMeter", "SkuPriceDetails", "SkuPriceId", "SubAccountId", "SubAccountName", "SubAccountType", "Tags",
    "x_TokenType", "x_RequestedModels", "x_Requests", "x_Runs", "x_SuccessfulOutcomes", "x_FailedOutcomes",
    "x_EscalatedOutcomes", "x_OutcomeValueUSD", "x_AvoidedCostUSD",
)

_GROUP = "day, org, team, \"user\", app, env, key_id, provider, model"
_SQL = (
    "WITH ev AS (SELECT date_trunc('day', ts_start) AS day, coalesce(org, '') AS org, coalesce(team, '') AS team, "
    "coalesce(\"user\", '') AS \"user\", coalesce(app, '') AS app, coalesce(env, '') AS env, "
    "coalesce(key_id, '') AS key_id, coalesce(provider, '') AS provider, model, requested_model, run_id, ts_start, "
    "input_tokens, cached_input_tokens, cache_write_tokens, output_tokens, cost_input_usd, cost_cache_read_usd, "
    "cost_cache_write_usd, cost_output_usd, avoided_cost_usd, cache_hit, cost_usd "
    "FROM events WHERE ts_start >= ? AND ts_start < ? AND coalesce(model, '') <> '' {team}), "
    # A run's outcome belongs to the group of its first call.
    "first_call AS (SELECT run_id, arg_min(struct_pack(day := day, org := org, team := team, \"user\" := \"user\", "
    "app := app, env := env, key_id := key_id, provider := provider, model := model), ts_start) AS g "
    "FROM ev WHERE run_id IS NOT NULL GROUP BY run_id), "
    "oc AS (SELECT f.g.day AS day, f.g.org AS org, f.g.team AS team, f.g.user AS \"user\", f.g.app AS app, "
    "f.g.env AS env, f.g.key_id AS key_id, f.g.provider AS provider, f.g.model AS model, count(*) AS runs, "
    "count(*) FILTER (WHERE o.status = 'success') AS ok, count(*) FILTER (WHERE o.status = 'failure') AS failed, "
    "count(*) FILTER (WHERE o.status = 'escalated') AS escalated, "
    "sum(o.value_usd) FILTER (WHERE o.status = 'success') AS value "
    "FROM first_call f LEFT JOIN run_outcome o USING (run_id) GROUP BY ALL), "
    "agg AS (SELECT " + _GROUP + ", count(*) AS requests, string_agg(DISTINCT requested_model, ',') AS requested, "
    "sum(avoided_cost_usd) AS avoided, "
    + ", ".join(f"{q} FILTER (WHERE cache_hit IS NULL) AS q_{k}, {c} FILTER (WHERE cache_hit IS NULL) AS c_{k}"
                for k, _, q, c in TOKEN_TYPES)
    + " FROM ev GROUP BY ALL) "
    "SELECT agg.*, coalesce(oc.runs, 0) AS runs, coalesce(oc.ok, 0) AS ok, coalesce(oc.failed, 0) AS failed, "
    "coalesce(oc.escalated, 0) AS escalated, oc.value FROM agg LEFT JOIN oc USING (" + _GROUP + ") "
    "ORDER BY " + _GROUP
)


def _z(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def focus_rows(wh: Warehouse, start: datetime, end: datetime, team: str | None = None,
               billing_account: str = "margin") -> list[dict[str, Any]]:
    """FOCUS rows for charges in [start, end) (the billing period), money as Decimal."""
    params: list[Any] = [start.astimezone(UTC).replace(tzinfo=None), end.astimezone(UTC).replace(tzinfo=None)]
    if team is not None:
        params.append(team)
    groups = wh.query(_SQL.format(team="AND team = ?" if team is not None else ""), params)
    out: list[dict[str, Any]] = []
    for g in groups:
        day = g["day"].replace(tzinfo=UTC)
        tags = {k: g[k] for k in ("org", "team", "user", "app", "env", "key_id") if g[k]}
        first = True
        for key, meter, _, _ in TOKEN_TYPES:
            qty, cost = int(g[f"q_{key}"] or 0), tidy(g[f"c_{key}"] or Decimal(0))
            # Skip empty token types; but a group with nothing billed (only refused calls or cache
            # hits) keeps one zero row, so its requests and outcomes still reach the x_ columns.
            if qty == 0 and cost == 0 and not (first and key == "output"):
                continue
            pq = Decimal(qty) / PER
            unit_price = tidy((cost / pq).quantize(Decimal("1e-18"))) if qty else Decimal(0)
            sku = f"{g['provider']}/{g['model']}/{key}"
            row: dict[str, Any] = {
                "BilledCost": cost, "EffectiveCost": cost, "ListCost": cost, "ContractedCost": cost,
                "BillingAccountId": g["org"] or billing_account, "BillingAccountName": g["org"] or billing_account,
                "BillingAccountType": "Organization", "BillingCurrency": "USD",
                "BillingPeriodStart": _z(start), "BillingPeriodEnd": _z(end),
                "ChargeCategory": "Usage", "ChargeClass": None,
                "ChargeDescription": f"{meter} of {g['model']} via {g['provider']}",
                "ChargeFrequency": "Usage-Based",
                "ChargePeriodStart": _z(day), "ChargePeriodEnd": _z(day + timedelta(days=1)),
                # No commitment discounts; present (null) because ConsumedQuantity's rules test it.
                "CommitmentDiscountStatus": None,
                "ConsumedQuantity": Decimal(qty), "ConsumedUnit": "Tokens",
                "ContractedUnitPrice": unit_price, "ListUnitPrice": unit_price,
                "InvoiceId": None,  # metered by margin, not yet on a provider's invoice

                "InvoiceIssuerName": g["provider"] or "margin", "PricingCategory": "Standard", "PricingCurrency": "USD",
                "PricingCurrencyContractedUnitPrice": unit_price, "PricingCurrencyEffectiveCost": cost,
                "PricingCurrencyListUnitPrice": unit_price, "PricingQuantity": pq, "PricingUnit": "1000000 Tokens",
                "ProviderName": g["provider"] or "margin", "PublisherName": g["provider"] or "margin",
                "ResourceId": f"{g['provider']}/{g['model']}", "ResourceName": g["model"], "ResourceType": "LLM Model",
                "ServiceCategory": "AI and Machine Learning", "ServiceName": f"{g['provider']} LLM API",
                "ServiceSubcategory": "Generative AI",
                "SkuId": sku, "SkuMeter": meter, "SkuPriceId": f"{sku}@{unit_price}",
                "SkuPriceDetails": orjson.dumps({"TokenType": key, "Model": g["model"]}).decode(),
                "SubAccountId": g["key_id"] or None, "SubAccountName": g["team"] or g["key_id"] or None,
                "SubAccountType": "Virtual Key" if g["key_id"] else None,
                "Tags": orjson.dumps(tags).decode(),
                "x_TokenType": key, "x_RequestedModels": g["requested"] or "",
                **_group_figures(g, first),
            }
            first = False
            out.append(row)
    return out


def _group_figures(g: dict[str, Any], first: bool) -> dict[str, Any]:
    if not first:
        return {"x_Requests": None, "x_Runs": None, "x_SuccessfulOutcomes": None, "x_FailedOutcomes": None,
                "x_EscalatedOutcomes": None, "x_OutcomeValueUSD": None, "x_AvoidedCostUSD": None}
    return {"x_Requests": int(g["requests"]), "x_Runs": int(g["runs"]), "x_SuccessfulOutcomes": int(g["ok"]),
            "x_FailedOutcomes": int(g["failed"]), "x_EscalatedOutcomes": int(g["escalated"]),
            "x_OutcomeValueUSD": tidy(g["value"]) if g["value"] is not None else None,
            "x_AvoidedCostUSD": tidy(g["avoided"] or Decimal(0))}


def write(rows: list[dict[str, Any]], out: Path, wh: Warehouse) -> Path:
    """CSV or Parquet by the file's suffix, written by DuckDB (exact decimals, no pandas/pyarrow)."""
    suffix = out.suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise ValueError(f"{out}: the output must end in .csv or .parquet")
    out.parent.mkdir(parents=True, exist_ok=True)
    page = {c: np.array([_cell(r[c]) for r in rows], dtype=object) for c in COLUMNS}
    casts = []
    for c in COLUMNS:
        if c in MONEY_COLUMNS or c in NUMBER_COLUMNS:
            casts.append(f"CAST(\"{c}\" AS {MONEY}) AS \"{c}\"")
        elif c in INT_COLUMNS:
            casts.append(f"CAST(\"{c}\" AS BIGINT) AS \"{c}\"")
        elif c in TIME_COLUMNS and suffix == ".parquet":
            casts.append(f"CAST(\"{c}\" AS TIMESTAMPTZ) AS \"{c}\"")
        else:
            casts.append(f"CAST(\"{c}\" AS VARCHAR) AS \"{c}\"")
    fmt = "(FORMAT parquet)" if suffix == ".parquet" else "(FORMAT csv, HEADER true)"
    path = str(out).replace("'", "''")
    cur = wh.cursor()
    try:
        if rows:
            cur.register("focus_rows", page)
            cur.execute(f"COPY (SELECT {', '.join(casts)} FROM focus_rows) TO '{path}' {fmt}")
            cur.unregister("focus_rows")
        else:  # an empty period still gets a file with the columns
            empty = ", ".join(f"CAST(NULL AS VARCHAR) AS \"{c}\"" for c in COLUMNS)
            cur.execute(f"COPY (SELECT {empty} WHERE FALSE) TO '{path}' {fmt}")
    finally:
        cur.close()
    return out


def _cell(v: Any) -> Any:
    return format(v, "f") if isinstance(v, Decimal) else v
