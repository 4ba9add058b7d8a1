"""Credit periods: which refill period a moment falls in, and when the next one starts."""

from __future__ import annotations

from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

_EPOCH = datetime(1970, 1, 1)


def _period_start(now: float, hours: int, tz: str) -> datetime:
    local = datetime.fromtimestamp(now, ZoneInfo(tz)).replace(tzinfo=None)
    if 24 % hours == 0:
        midnight = local.replace(hour=0, minute=0, second=0, microsecond=0)
        return midnight + timedelta(hours=local.hour // hours * hours)
    index = int((local - _EPOCH).total_seconds() // (hours * 3600))
    return _EPOCH + timedelta(hours=index * hours)


def period_key(now: float, hours: int = 24, tz: str = "UTC") -> str:
    """A stable key for the refill period containing ``now`` (daily: the local date)."""
    start = _period_start(now, hours, tz)
    if hours == 24:
        return start.date().isoformat()
    return start.strftime("%Y-%m-%dT%H") + f"/{hours}h"


def next_refill(now: float, hours: int = 24, tz: str = "UTC") -> datetime:
    """When the next period starts, as an aware datetime in ``tz``."""
    start = _period_start(now, hours, tz) + timedelta(hours=hours)
    return start.replace(tzinfo=ZoneInfo(tz))
