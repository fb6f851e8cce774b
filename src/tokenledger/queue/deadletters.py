"""The dead-letter store: messages that could not be applied, kept with the reason until
re-driven (``tokenledger dlq retry``) or dropped."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, literal_column, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from tokenledger.db.uow import uow_of
from tokenledger.messages import fingerprint
from tokenledger.queue.models import DeadLetter
from tokenledger.timeutil import as_utc
from tokenledger.webhooks import service as webhooks
from tokenledger.webhooks.service import WebhookEvent


def depth(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(DeadLetter)) or 0


def list_dead_letters(session: Session, limit: int = 100) -> list[dict[str, Any]]:
    return [{
        "id": d.id, "key": d.key, "reason": d.reason, "attempts": d.attempts,
        "first_seen": as_utc(d.first_seen).isoformat(),
        "last_seen": as_utc(d.last_seen).isoformat(), "payload": d.payload,
    } for d in session.scalars(select(DeadLetter).order_by(DeadLetter.id).limit(limit))]


def select_ids(session: Session, ids: list[int] | None) -> list[DeadLetter]:
    query = select(DeadLetter).order_by(DeadLetter.id).with_for_update(skip_locked=True)
    if ids is not None:
        query = query.where(DeadLetter.id.in_(ids))
    return list(session.scalars(query))


def payload_of(letter: DeadLetter) -> Any:
    """The original message as published (JSON), or the raw text if it never was JSON."""
    try:
        return json.loads(letter.payload)
    except ValueError:
        return letter.payload


@dataclass
class Redrive:
    """What ``redrive`` did: letters sent again, letters kept (and why), ids not found."""

    sent: list[int] = field(default_factory=list)
    kept: list[tuple[int, str]] = field(default_factory=list)
    missing: list[int] = field(default_factory=list)


def redrive(session: Session, producer: Any, ids: list[int] | None) -> Redrive:
    """Publish dead letters again as they were (the worker validates them again) and
    delete them; a malformed message cannot be published again and is kept."""
    letters = select_ids(session, ids)
    out = Redrive(missing=sorted(set(ids or ()) - {letter.id for letter in letters}))
    for letter in letters:
        payload = payload_of(letter)
        if isinstance(payload, dict) and payload.get("malformed"):
            out.kept.append((letter.id, "a malformed message cannot be published again; "
                                        "`tokenledger dlq drop` removes it"))
            continue
        if isinstance(payload, dict) and {"task", "args"} <= set(payload):
            producer.send(payload["task"], payload["args"], payload.get("kwargs") or None)
        else:
            producer.publish_events(payload)
        session.delete(letter)
        out.sent.append(letter.id)
    return out


def drop(session: Session, ids: list[int] | None) -> int:
    """Delete dead letters for good (all when ``ids`` is None)."""
    query = delete(DeadLetter)
    if ids is not None:
        query = query.where(DeadLetter.id.in_(ids))
    return session.execute(query).rowcount or 0


def _storable(text: str, limit: int) -> str:
    """``text`` as a text column takes it: NUL escaped, lone surrogates replaced, bounded."""
    text = text.replace("\x00", "\\u0000")
    return text.encode("utf-8", "replace").decode("utf-8")[:limit]


Letter = tuple[Any, str, "str | None"]  # (payload, reason, event key or None)


def record(session: Session, payload: Any, reason: str, now: datetime,
           key: str | None = None) -> None:
    """Keep one message that cannot be applied (see ``record_many``)."""
    record_many(session, [(payload, reason, key)], now)


def record_many(session: Session, letters: Sequence[Letter], now: datetime) -> None:
    """Keep messages that cannot be applied, in one statement; a repeat bumps attempts and
    last_seen. New ones are announced (``dead_letter_added``) in the same transaction.
    Whatever a message holds, the letter can be stored: a key the column cannot hold is
    left out (it stays in the payload), NUL bytes are escaped, sizes bounded."""
    rows: dict[str, dict[str, Any]] = {}
    for payload, reason, key in letters:
        digest = fingerprint(payload)
        if digest in rows:  # the same message twice in one group: one row, two attempts
            rows[digest]["attempts"] += 1
            continue
        text = payload if isinstance(payload, str) else json.dumps(payload, default=str)
        if key is not None and (len(key) > 255 or _storable(key, 255) != key):
            key = None
        rows[digest] = {"fingerprint": digest, "key": key,
                        "payload": _storable(text, 1_000_000),
                        "reason": _storable(reason, 2000), "attempts": 1,
                        "first_seen": now, "last_seen": now}
    if not rows:
        return
    table = DeadLetter.__table__
    stmt = insert(DeadLetter).values(list(rows.values()))
    stmt = stmt.on_conflict_do_update(
        index_elements=["fingerprint"],
        set_={"attempts": table.c.attempts + stmt.excluded.attempts,
              "last_seen": stmt.excluded.last_seen, "reason": stmt.excluded.reason},
    ).returning(table.c.id, table.c.key, table.c.reason,
                literal_column("xmax = 0"))  # true when the row was inserted, not updated
    # Announced without the payload: it may carry personal data and unchecked input.
    added = [WebhookEvent(
        "dead_letter_added", f"dead_letter:{letter_id}",
        {"dead_letter_id": letter_id, "key": key, "reason": reason,
         "first_seen": now.isoformat()}, f"dead_letter_added:{letter_id}")
        for letter_id, key, reason, inserted in session.execute(stmt) if inserted]
    uow = uow_of(session)
    if added and uow is not None:
        webhooks.record(uow, added)
