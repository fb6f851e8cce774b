"""What the dashboard reads that no domain report gives yet. Read-only, in the caller's
session; each reads a bounded page through an index (keyset, never an offset)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import extract, func, select
from sqlalchemy.orm import Session

from tokenledger.ledger.models import Account, EventConflict, EventOutcome
from tokenledger.tokenprocess.models import OPEN, Hold

if TYPE_CHECKING:
    from tokenledger.config import Settings

OUTCOME_KINDS = ("applied", "declined", "rejected")


def _like_prefix(text: str) -> str:
    """A LIKE pattern matching what starts with ``text`` (its wildcards taken literally)."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def search_accounts(session: Session, prefix: str, after: str | None, limit: int
                    ) -> tuple[list[dict[str, Any]], bool]:
    """Accounts whose user id starts with ``prefix``, in user id order after ``after``
    (keyset through the user id index); and whether more follow."""
    a = Account
    query = select(a.user_id, a.plan_code, a.timezone, a.created_at, a.last_renewal_at,
                   a.last_reset_on)
    if prefix:
        query = query.where(a.user_id.like(_like_prefix(prefix), escape="\\"))
    if after:
        query = query.where(a.user_id > after)
    rows = session.execute(query.order_by(a.user_id).limit(limit + 1)).all()
    return [dict(r._mapping) for r in rows[:limit]], len(rows) > limit


def open_holds(session: Session, account_id: int, limit: int = 50) -> list[dict[str, Any]]:
    """The account's open token-process holds, newest first."""
    h = Hold
    return [dict(r._mapping) for r in session.execute(
        select(h.id, h.feature, h.model, h.amount, h.created_at, h.expires_at)
        .where(h.account_id == account_id, h.status == OPEN)
        .order_by(h.id.desc()).limit(limit))]


def outcomes(session: Session, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The stored outcome of each key that has one (by primary key)."""
    wanted = sorted({k for k in keys if k})
    if not wanted:
        return {}
    o = EventOutcome
    return {r.key: dict(r._mapping) for r in session.execute(
        select(o.key, o.user_id, o.event_type, o.outcome, o.reason, o.result, o.created_at)
        .where(o.key.in_(wanted)))}


def conflicts(session: Session, before: int | None, limit: int
              ) -> tuple[list[dict[str, Any]], bool]:
    """Recorded conflicts (a key reused with another payload), newest first, each with
    the outcome stored for its key; and whether older ones follow."""
    c = EventConflict
    query = select(c.id, c.key, c.payload_hash, c.payload, c.seen_at)
    if before is not None:
        query = query.where(c.id < before)
    rows = [dict(r._mapping) for r in session.execute(
        query.order_by(c.id.desc()).limit(limit + 1))]
    stored = outcomes(session, (r["key"] for r in rows[:limit]))
    for row in rows:
        row["stored"] = stored.get(row["key"])
        row["payload_json"] = json.dumps(row["payload"], indent=2, sort_keys=True)
    return rows[:limit], len(rows) > limit


def conflict(session: Session, conflict_id: int) -> dict[str, Any] | None:
    """One recorded conflict, or None."""
    c = EventConflict
    row = session.execute(select(c.id, c.key, c.payload_hash, c.payload, c.seen_at)
                          .where(c.id == conflict_id)).first()
    return dict(row._mapping) if row is not None else None


def count_conflicts(session: Session) -> int:
    """How many conflicts are recorded."""
    return session.scalar(select(func.count()).select_from(EventConflict)) or 0


def events_per_minute(session: Session, now: datetime, minutes: int = 60
                      ) -> tuple[list[str], dict[str, list[float]]]:
    """Stored outcomes per second, per minute of the last ``minutes`` (read through the
    outcomes' time index): the minutes' labels (HH:MM, UTC) and a series per outcome."""
    end = now.replace(second=0, microsecond=0) + timedelta(minutes=1)
    start = end - timedelta(minutes=minutes)
    o = EventOutcome
    minute = func.floor(extract("epoch", o.created_at) / 60)
    series = {kind: [0.0] * minutes for kind in OUTCOME_KINDS}
    first = math.floor(start.timestamp() / 60)
    for row in session.execute(
        select(minute.label("minute"), o.outcome, func.count().label("n"))
        .where(o.created_at >= start, o.created_at < end).group_by(minute, o.outcome)
    ):
        slot = int(row.minute) - first
        if 0 <= slot < minutes and row.outcome in series:
            series[row.outcome][slot] = row.n / 60
    labels = [(start + timedelta(minutes=i)).strftime("%H:%M") for i in range(minutes)]
    return labels, series


def workers_seen(settings: Settings, timeout: float = 1.0) -> dict[str, Any]:
    """The workers answering on the broker within ``timeout`` seconds, with the queues
    each consumes (or the error that kept them from being asked)."""
    from tokenledger.queue import workers

    seen = workers.ask(settings, timeout)
    if seen.error:
        return {"workers": [], "error": seen.error}
    return {"workers": [{"name": name, "queues": seen.queues[name]} for name in seen.queues],
            "error": None}

