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


_AGE_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_age(value: str) -> timedelta:
    """``"400d"``, ``"12h"``, ``"90m"`` or ``"30s"`` as a duration; ValueError otherwise."""
    text = value.strip().lower()
    unit = _AGE_UNITS.get(text[-1:]) if text else None
    if unit is None or not text[:-1].isdigit():
        raise ValueError(f"{value!r} is not an age: give a number and a unit, like 400d or 12h")
    seconds = int(text[:-1]) * unit
    if not 0 < seconds <= 100 * 365 * 86400:
        raise ValueError(f"{value!r} must be more than 0 and at most 100 years")
    return timedelta(seconds=seconds)
