"""Daily-spend forecasts with weekly seasonality and a prediction interval, their backtest, and a
budget's predicted exhaustion date.

The model is statsmodels' ETS with multiplicative error, additive trend and multiplicative weekly
seasonality, ETS(M,A,M), chosen by a rolling-origin backtest against statsforecast's AutoETS,
AutoARIMA and MSTL and other ETS forms (docs/analytics.md has the numbers: it had the lowest MAPE
of the statsmodels forms and the best-calibrated 95% interval of all). statsmodels is imported
lazily (about 2 s): the gateway runs this in a worker thread, never on its event loop.

Fallbacks, so every series gets an answer: a series with a zero or negative day uses additive
errors and seasonality, ETS(A,A,A); fewer than 14 days uses the mean of the last week with an
interval from its spread; a fit that fails uses the seasonal naive forecast."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any

import numpy as np

Series = Sequence[float | Decimal] | np.ndarray
SEASON = 7
MIN_ETS_DAYS = 2 * SEASON


@dataclass(frozen=True)
class Forecast:
    start: date  # the first forecast day
    mean: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    level: float
    model: str

    @property
    def days(self) -> list[date]:
        return [self.start + timedelta(days=i) for i in range(len(self.mean))]

    def rows(self) -> list[dict[str, Any]]:
        return [{"day": d.isoformat(), "mean": round(float(m), 6), "lower": round(float(lo), 6),
                 "upper": round(float(hi), 6)}
                for d, m, lo, hi in zip(self.days, self.mean, self.lower, self.upper, strict=True)]


def _z(level: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(0.5 + level / 2)


def _ets(y: np.ndarray, horizon: int, level: float, multiplicative: bool) -> tuple[np.ndarray, ...]:
    import pandas as pd
    from statsmodels.tsa.exponential_smoothing.ets import ETSModel

    kind = "mul" if multiplicative else "add"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter on short or flat series
        fit = ETSModel(pd.Series(y), error=kind, trend="add", seasonal=kind, seasonal_periods=SEASON).fit(disp=False)
        frame = fit.get_prediction(start=len(y), end=len(y) + horizon - 1).summary_frame(alpha=1 - level)
    return frame["mean"].to_numpy(), frame["pi_lower"].to_numpy(), frame["pi_upper"].to_numpy()


def seasonal_naive(y: np.ndarray, horizon: int, level: float = 0.95) -> tuple[np.ndarray, ...]:
    """Same weekday last week; the interval from last-week-to-this-week changes seen so far."""
    idx = [len(y) - SEASON + (i % SEASON) for i in range(horizon)]
    mean = y[idx].astype(float)
    diffs = y[SEASON:] - y[:-SEASON] if len(y) > SEASON else np.zeros(1)
    spread = _z(level) * float(np.std(diffs))
    return mean, mean - spread, mean + spread


def forecast(history: Series, start: date, horizon: int, level: float = 0.95) -> Forecast:
    """Forecast `horizon` days from `start` (the day after the last of `history`)."""
    y = np.asarray([float(v) for v in history], dtype=float)
    if horizon < 1:
        raise ValueError("horizon must be at least one day")
    if len(y) < MIN_ETS_DAYS:
        recent = y[-SEASON:] if len(y) else np.zeros(1)
        m = float(np.mean(recent))
        spread = _z(level) * max(float(np.std(recent)), 0.1 * abs(m))
        mean = np.full(horizon, m)
        model = "mean of last 7 days"
        lo, hi = mean - spread, mean + spread
    else:
        multiplicative = bool(np.all(y > 0))
        model = "ETS(M,A,M)" if multiplicative else "ETS(A,A,A)"
        try:
            mean, lo, hi = _ets(y, horizon, level, multiplicative)
            if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
                raise ValueError("non-finite forecast")
        except Exception:  # a degenerate series (e.g. constant) must still get a forecast
            mean, lo, hi = seasonal_naive(y, horizon, level)
            model = "seasonal naive"
    # Spend is never negative: clip the mean and the interval at zero.
    return Forecast(start, np.maximum(mean, 0.0), np.maximum(lo, 0.0), np.maximum(hi, 0.0), level, model)


def mape(actual: np.ndarray, predicted: np.ndarray) -> float | None:
    """Mean absolute percentage error in %, over days with non-zero actual spend."""
    mask = actual != 0
    if not mask.any():
        return None
    return float(np.mean(np.abs((actual[mask] - predicted[mask]) / actual[mask]))) * 100


def backtest(history: Series, horizon: int = 7, folds: int = 4,
             level: float = 0.95) -> dict[str, Any]:
    """Rolling origin: for each of the last `folds` windows of `horizon` days, fit on everything
    before and forecast the window. MAPE of the model and of the seasonal naive baseline, and how
    often the actual day fell inside the prediction interval."""
    y = np.asarray([float(v) for v in history], dtype=float)
    if len(y) < MIN_ETS_DAYS + horizon:
        raise ValueError(f"a backtest needs at least {MIN_ETS_DAYS + horizon} days of history (got {len(y)})")
    folds = min(folds, (len(y) - MIN_ETS_DAYS) // horizon)
    errs, naive_errs, inside, models = [], [], [], set()
    for k in range(folds, 0, -1):
        cut = len(y) - k * horizon
        train, test = y[:cut], y[cut:cut + horizon]
        fc = forecast(train, date(2000, 1, 1), len(test), level)
        models.add(fc.model)
        e, n = mape(test, fc.mean), mape(test, seasonal_naive(train, len(test), level)[0])
        if e is not None and n is not None:
            errs.append(e)
            naive_errs.append(n)
        inside.extend(((test >= fc.lower) & (test <= fc.upper)).tolist())
    return {"days": len(y), "folds": folds, "horizon_days": horizon, "model": ", ".join(sorted(models)),
            "mape_pct": round(float(np.mean(errs)), 2) if errs else None,
            "seasonal_naive_mape_pct": round(float(np.mean(naive_errs)), 2) if naive_errs else None,
            "interval_level": level,
            "interval_coverage": round(float(np.mean(inside)), 4) if inside else None}


def first_day(series: np.ndarray, left: float, done_today: float, today: date) -> str | None:
    """The first day (ISO) on which a daily forecast starting today adds up to `left`, counting of
    today only what it adds to `done_today`; None if never within the series."""
    total = 0.0
    for i, v in enumerate(series):
        total += max(0.0, float(v) - done_today) if i == 0 else float(v)
        if total >= left * (1 - 1e-9):  # float noise of the fit must not push a day later
            return (today + timedelta(days=i)).isoformat()
    return None


def exhaustion_days(fc: Forecast, left: float, done_today: float, today: date) -> dict[str, str | None]:
    """Expected, earliest (upper bound) and latest (lower bound) exhaustion day of an already fitted
    forecast (the dashboard fits once per page and reuses it)."""
    return {"exhausted_on": first_day(fc.mean, left, done_today, today),
            "earliest": first_day(fc.upper, left, done_today, today),
            "latest": first_day(fc.lower, left, done_today, today)}


def exhaustion(history: Series, spent: Decimal, limit: Decimal, now: datetime,
               period_end: datetime, today_spent: Decimal = Decimal(0), level: float = 0.95) -> dict[str, Any]:
    """When a budget runs out if spend follows the forecast: `history` is the daily spend of the
    scope up to yesterday (UTC days), `spent` the period's spend so far (today included). Returns
    the expected day, the earliest (interval's upper bound) and the latest (lower bound); None
    means not before the period ends. A pure function the gateway's budget status can call."""
    if spent >= limit:
        return {"exhausted_on": now.date().isoformat(), "earliest": now.date().isoformat(),
                "latest": now.date().isoformat(), "model": "already exhausted"}
    today = now.date()
    last = (period_end - timedelta(microseconds=1)).date()
    horizon = max(1, (last - today).days + 1)
    fc = forecast(history, today, horizon, level)
    left = float(limit - spent)
    done_today = float(today_spent)
    return {**exhaustion_days(fc, left, done_today, today), "model": fc.model,
            "forecast_to_period_end_usd": round(float(fc.mean.sum()) - min(done_today, float(fc.mean[0])), 6)}

