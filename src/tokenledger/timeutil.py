"""Time helpers: everything stored is UTC; local days exist only for resets."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime | None) -> datetime | None:
    """Aware UTC datetime (a naive value is taken as UTC)."""
    if value is None:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def local_date(now: datetime, tz: str) -> str:
    """The calendar date (ISO) at ``now`` in timezone ``tz``."""
    return now.astimezone(ZoneInfo(tz)).date().isoformat()


def next_local_midnight(now: datetime, tz: str) -> datetime:
    """The next 00:00 wall-clock time in ``tz`` after ``now``, as UTC. DST-safe."""
    zone = ZoneInfo(tz)
    local = now.astimezone(zone)
    midnight = datetime.combine(local.date() + timedelta(days=1), time(0), tzinfo=zone)
    return midnight.astimezone(UTC)
