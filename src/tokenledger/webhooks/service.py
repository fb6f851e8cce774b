"""Webhook endpoints and the outbox: every event recorded in the transaction of the change
that caused it, then delivered by the workers (``relay``).

Recording is one statement text, ``sql/fan_out.sql``: the balance writers include it
through the low-balance rule (``balance_changed``, ``balance_low``,
``balance_recovered``); :func:`record` runs it for the other events (``hold_expired``,
``renewal_run_finished``, ``renewal_failure_alert``, ``dead_letter_added``) on the unit
of work's session. Either way a rolled-back change records nothing, and a committed one
wakes the relay (:func:`deliver_after_commit`).

``TOKENLEDGER_ALERT_WEBHOOK_URL``, when set, is an implicit endpoint subscribed to
``renewal_failure_alert`` and ``dead_letter_added``: alerts go through the same outbox,
signed and retried like every other delivery.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from sqlalchemy import select, text, update
from sqlalchemy.orm import Session

from tokenledger.db.sql import load
from tokenledger.errors import NotFound, ValidationFailed
from tokenledger.timeutil import as_utc
from tokenledger.webhooks.models import (
    CANCELLED,
    DELIVERY_STATUSES,
    EVENT_TYPES,
    PENDING,
    WebhookDelivery,
    WebhookEndpoint,
)

if TYPE_CHECKING:
    from tokenledger.config import Settings
    from tokenledger.db.uow import UnitOfWork

# The events the implicit endpoint of TOKENLEDGER_ALERT_WEBHOOK_URL receives.
ALERT_EVENTS = ("renewal_failure_alert", "dead_letter_added")
_PKG = "tokenledger.webhooks"

_RECORD = text(
    "WITH webhook_events (type, subject, data, dedupe) AS ("
    " SELECT * FROM unnest(CAST(:types AS text[]), CAST(:subjects AS text[]),"
    " CAST(CAST(:datas AS text[]) AS jsonb[]), CAST(:dedupes AS text[]))), "
    + load(_PKG, "fan_out") + " SELECT count(*) FROM hooks")

# The implicit alert endpoint follows the setting: another URL's is retired, this one's
# made once, its secret kept from then on (the partial unique index settles a race
# between two processes).
_ENSURE_ALERT_ENDPOINT = text(
    "WITH retired AS (UPDATE webhook_endpoints SET active = false, removed_at = :now"
    " WHERE implicit AND active AND url <> :url RETURNING 1)"
    " INSERT INTO webhook_endpoints (url, event_types, secret, description, implicit, active,"
    " created_at) VALUES (:url, CAST(:types AS varchar[]), :secret,"
    " 'TOKENLEDGER_ALERT_WEBHOOK_URL', true, true, :now)"
    " ON CONFLICT (url) WHERE implicit AND active DO NOTHING")


@dataclass(frozen=True, slots=True)
class WebhookEvent:
    """One event to announce: its type, whom it is about, its data, and the key that makes
    recording it twice one delivery per endpoint."""

    type: str
    subject: str | None
    data: dict[str, Any]
    dedupe: str


def record(uow: UnitOfWork, events: Sequence[WebhookEvent]) -> int:
    """Record ``events`` for every endpoint subscribed to them, in ``uow``'s transaction;
    delivery starts once it commits. Recording an event twice is one delivery. Returns
    the deliveries written."""
    if not events:
        return 0
    session = uow.session
    url = uow.settings.alert_webhook_url
    if url and any(e.type in ALERT_EVENTS for e in events):
        ensure_alert_endpoint(session, url, uow.now)
    written = session.execute(_RECORD, {
        "types": [e.type for e in events], "subjects": [e.subject for e in events],
        "datas": [json.dumps(e.data, default=str) for e in events],
        "dedupes": [e.dedupe for e in events], "now": uow.now}).scalar_one()
    if written:
        deliver_after_commit(uow)
    return int(written)


def ensure_alert_endpoint(session: Session, url: str, now: datetime) -> None:
    """Make ``TOKENLEDGER_ALERT_WEBHOOK_URL`` (``url``) the one live implicit endpoint. A
    process without the setting leaves it be (others may have it): `webhooks remove`
    retires it."""
    session.execute(_ENSURE_ALERT_ENDPOINT, {"url": url, "types": list(ALERT_EVENTS),
                                             "secret": new_secret(), "now": now})


def deliver_after_commit(uow: UnitOfWork) -> None:
    """Wake the relay once ``uow`` commits (deliveries it recorded go out then)."""
    settings = uow.settings
    uow.after_commit(lambda: deliver_soon(settings))


def deliver_soon(settings: Settings) -> None:
    """Wake the relay soon, from a background thread: never blocks the caller."""
    from tokenledger.webhooks import relay

    relay.wake(settings)


# -- endpoints ------------------------------------------------------------------------------


def new_secret() -> str:
    """A Standard Webhooks signing secret: ``whsec_`` and 32 random bytes in base64."""
    import base64

    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def check_url(url: str) -> str:
    """An http(s) URL with a host, else ValidationFailed naming the field."""
    url = url.strip()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or len(url) > 2000:
        raise ValidationFailed(f"url: {url!r} is not an http:// or https:// URL")
    return url


def check_event_types(event_types: Sequence[str]) -> list[str]:
    """Known event types, each once, else ValidationFailed naming the field."""
    chosen = list(dict.fromkeys(event_types))
    if not chosen:
        raise ValidationFailed(f"event_types: give at least one of {', '.join(EVENT_TYPES)}")
    unknown = [t for t in chosen if t not in EVENT_TYPES]
    if unknown:
        raise ValidationFailed(f"event_types: unknown {', '.join(map(repr, unknown))}; one of "
                               f"{', '.join(EVENT_TYPES)}")
    return chosen


def add_endpoint(session: Session, url: str, event_types: Sequence[str],
                 description: str | None, now: datetime) -> dict[str, Any]:
    """Register an endpoint for ``event_types``; the answer holds its signing secret."""
    endpoint = WebhookEndpoint(url=check_url(url), event_types=check_event_types(event_types),
                               secret=new_secret(), description=description, implicit=False,
                               active=True, created_at=now)
    session.add(endpoint)
    session.flush()
    return endpoint_out(endpoint, secret=True)


def endpoint_out(e: WebhookEndpoint, secret: bool = False) -> dict[str, Any]:
    """An endpoint as plain data (the secret only when asked)."""
    data: dict[str, Any] = {
        "id": e.id, "url": e.url, "event_types": list(e.event_types),
        "description": e.description, "implicit": e.implicit, "active": e.active,
        "created_at": as_utc(e.created_at).isoformat(),
        "removed_at": as_utc(e.removed_at).isoformat() if e.removed_at else None}
    if secret:
        data["secret"] = e.secret
    return data


def list_endpoints(session: Session, include_removed: bool = False,
                   secrets_: bool = False) -> list[dict[str, Any]]:
    """The endpoints, oldest first (removed ones only when asked)."""
    query = select(WebhookEndpoint).order_by(WebhookEndpoint.id)
    if not include_removed:
        query = query.where(WebhookEndpoint.active)
    return [endpoint_out(e, secrets_) for e in session.scalars(query)]


def remove_endpoint(session: Session, endpoint_id: int, now: datetime) -> int:
    """Stop delivering to an endpoint: it is kept (its deliveries name it) but inactive,
    and its pending deliveries are cancelled. Returns how many were cancelled."""
    endpoint = session.get(WebhookEndpoint, endpoint_id, with_for_update=True)
    if endpoint is None or not endpoint.active:
        raise NotFound(f"webhook endpoint {endpoint_id} not found")
    endpoint.active = False
    endpoint.removed_at = now
    d = WebhookDelivery
    return session.execute(update(d).where(d.endpoint_id == endpoint_id, d.status == PENDING)
                           .values(status=CANCELLED, last_error="endpoint removed")).rowcount


# -- deliveries -------------------------------------------------------------------------------


def delivery_out(d: WebhookDelivery) -> dict[str, Any]:
    """A delivery as plain data."""
    def when(value: datetime | None) -> str | None:
        return as_utc(value).isoformat() if value else None

    return {"id": d.id, "webhook_id": d.webhook_id, "endpoint_id": d.endpoint_id,
            "event_type": d.event_type, "status": d.status, "attempts": d.attempts,
            "next_attempt_at": when(d.next_attempt_at) if d.status == PENDING else None,
            "last_attempt_at": when(d.last_attempt_at), "last_status": d.last_status,
            "last_error": d.last_error, "created_at": when(d.created_at),
            "delivered_at": when(d.delivered_at), "payload": d.payload}


def list_deliveries(session: Session, *, status: str | None = None,
                    endpoint_id: int | None = None, event_type: str | None = None,
                    limit: int = 50) -> list[dict[str, Any]]:
    """Deliveries, newest first, optionally of one status, endpoint and event type."""
    if status is not None and status not in DELIVERY_STATUSES:
        raise ValidationFailed(f"status: one of {', '.join(DELIVERY_STATUSES)}")
    if event_type is not None:
        check_event_types([event_type])
    d = WebhookDelivery
    query = select(d).order_by(d.id.desc()).limit(limit)
    if status is not None:
        query = query.where(d.status == status)
    if endpoint_id is not None:
        query = query.where(d.endpoint_id == endpoint_id)
    if event_type is not None:
        query = query.where(d.event_type == event_type)
    return [delivery_out(row) for row in session.scalars(query)]


def redeliver(uow: UnitOfWork, delivery_id: int) -> dict[str, Any]:
    """Send a delivery again, whatever its status, with the same webhook id (receivers
    deduplicate by it) and a fresh retry schedule; it goes out once ``uow`` commits."""
    delivery = uow.session.get(WebhookDelivery, delivery_id, with_for_update=True)
    if delivery is None:
        raise NotFound(f"webhook delivery {delivery_id} not found")
    delivery.status = PENDING
    delivery.attempts = 0
    delivery.next_attempt_at = uow.now
    delivery.delivered_at = None
    uow.session.flush()
    deliver_after_commit(uow)
    return delivery_out(delivery)
