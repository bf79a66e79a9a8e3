"""Query-string parameters of the dashboard pages -> a time window and an analytics `Filter`.

Pure: time is an argument. A viewer's team restriction is not a parameter: the caller passes the
session's team, and it always wins over anything in the query string."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from margin.analytics.filters import Filter, check_dimension

PERIODS = {"24h": "Last 24 hours", "7d": "Last 7 days", "30d": "Last 30 days", "90d": "Last 90 days",
           "mtd": "This month", "last-month": "Last month", "custom": "Custom dates"}
BUCKETS = {"auto": "Auto", "hour": "Hourly", "day": "Daily", "week": "Weekly"}
BY_CHOICES = {"model": "Model", "team": "Team", "app": "App", "env": "Environment", "user": "User",
              "provider": "Provider", "workflow": "Workflow", "tag:feature": "Feature (tag)"}
FILTER_DIMS = ("team", "model", "app", "env")
MAX_DAYS = 400
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


@dataclass(frozen=True, slots=True)
class View:
    period: str
    since: datetime
    until: datetime
    bucket: str  # hour | day | week (resolved from auto)
    bucket_choice: str
    where: tuple[tuple[str, str], ...] = ()
    frm: str = ""  # custom range, as typed (YYYY-MM-DD)
    to: str = ""

    @property
    def label(self) -> str:
        if self.period == "custom":
            return f"{self.frm} to {self.to}"
        return PERIODS[self.period]

    def pairs(self, **extra: str) -> list[tuple[str, str]]:
        q: dict[str, str] = {"period": self.period, "bucket": self.bucket_choice}
        if self.period == "custom":
            q.update({"from": self.frm, "to": self.to})
        q.update(dict(self.where))
        q.update({k: v for k, v in extra.items() if v})
        return list(q.items())

    def query(self, **extra: str) -> str:
        """This view as a query string (for links, the CSV download and the live refresh)."""
        from urllib.parse import urlencode

        return urlencode(self.pairs(**extra))


def _day(text: str, name: str) -> date:
    if not _DATE.match(text):
        raise ValueError(f"'{name}' must be a date YYYY-MM-DD (got {text!r})")
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise ValueError(f"'{name}' is not a real date: {text!r}") from None


def window(period: str, now: datetime, frm: str = "", to: str = "") -> tuple[datetime, datetime]:
    now = now.astimezone(UTC)
    month0 = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    spans = {"24h": timedelta(hours=24), "7d": timedelta(days=7), "30d": timedelta(days=30), "90d": timedelta(days=90)}
    if period in spans:
        return now - spans[period], now
    if period == "mtd":
        return month0, now
    if period == "last-month":
        return (month0 - timedelta(days=1)).replace(day=1), month0
    if period == "custom":
        a, b = _day(frm, "from"), _day(to, "to")
        if b < a:
            raise ValueError(f"'to' ({to}) is before 'from' ({frm})")
        if (b - a).days >= MAX_DAYS:
            raise ValueError(f"a custom range may span at most {MAX_DAYS} days")
        return datetime(a.year, a.month, a.day, tzinfo=UTC), datetime(b.year, b.month, b.day, tzinfo=UTC) + timedelta(
            days=1)
    raise ValueError(f"period {period!r}: choose one of {', '.join(PERIODS)}")


def auto_bucket(since: datetime, until: datetime) -> str:
    span = until - since
    if span <= timedelta(days=2):
        return "hour"
    return "day" if span <= timedelta(days=92) else "week"


def parse_view(q: dict[str, str], now: datetime, default_period: str = "7d", viewer: bool = False) -> View:
    """Raises ValueError with a message fit for the page when a parameter is wrong."""
    period = q.get("period") or default_period
    since, until = window(period, now, q.get("from", ""), q.get("to", ""))
    choice = q.get("bucket") or "auto"
    if choice not in BUCKETS:
        raise ValueError(f"bucket {choice!r}: choose one of {', '.join(BUCKETS)}")
    bucket = auto_bucket(since, until) if choice == "auto" else choice
    if bucket == "hour" and until - since > timedelta(days=14):
        raise ValueError("hourly buckets are offered for ranges up to 14 days: pick daily or a shorter period")
    where = []
    for d in FILTER_DIMS:
        v = q.get(d, "")
        if not v or (viewer and d == "team"):  # a viewer's team comes from its session, never the URL
            continue
        if len(v) > 200:
            raise ValueError(f"'{d}' is longer than 200 characters")
        where.append((d, v))
    return View(period, since, until, bucket, choice, tuple(where), q.get("from", ""), q.get("to", ""))


def parse_by(text: str | None, default: str = "model") -> str:
    by = text or default
    if by in BY_CHOICES:
        return by
    try:
        check_dimension(by)
    except ValueError as e:
        raise ValueError(f"by: {e}") from None
    if not by.startswith("tag:"):
        raise ValueError(f"by {by!r}: choose one of {', '.join(BY_CHOICES)} or tag:<name>")
    return by


def make_filter(v: View, team: str | None) -> Filter:
    """`team`: the viewer's team (None for an admin). It is a Filter field, so it is in the SQL."""
    return Filter(since=v.since, until=v.until, team=team, where=v.where)


def buckets(since: datetime, until: datetime, bucket: str) -> list[datetime]:
    """Every bucket start from the one holding `since` to the one holding the last instant before
    `until` (naive UTC, as the warehouse's date_trunc returns them), so charts show empty buckets."""
    t = since.astimezone(UTC).replace(tzinfo=None, minute=0, second=0, microsecond=0)
    if bucket != "hour":
        t = t.replace(hour=0)
    if bucket == "week":
        t -= timedelta(days=t.weekday())
    step = {"hour": timedelta(hours=1), "day": timedelta(days=1), "week": timedelta(days=7)}[bucket]
    end = until.astimezone(UTC).replace(tzinfo=None)
    out = []
    while t < end:
        out.append(t)
        t += step
    return out


def bucket_label(t: datetime, bucket: str) -> str:
    return t.strftime("%m-%d %H:00") if bucket == "hour" else t.strftime("%Y-%m-%d")
