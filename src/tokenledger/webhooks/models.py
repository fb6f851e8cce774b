"""Webhook endpoints and the outbox of their deliveries.

A delivery row is written in the same transaction as the change it announces (the
outbox), then sent by the workers (``webhooks.relay``) until the endpoint answers 2xx or
the retry schedule runs out. Its ``webhook_id`` is the Standard Webhooks message id: one
per event and endpoint, the same on every attempt, so receivers deduplicate by it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    Boolean,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    SmallInteger,
    String,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Mapped, mapped_column

from tokenledger.db.base import Base, BigId, Json, Timestamp, one_of

EVENT_TYPES = (
    "balance_low", "balance_recovered", "balance_changed", "hold_expired",
    "renewal_run_finished", "renewal_failure_alert", "dead_letter_added",
)
PENDING, DELIVERED, FAILED, CANCELLED = "pending", "delivered", "failed", "cancelled"
DELIVERY_STATUSES = (PENDING, DELIVERED, FAILED, CANCELLED)


class WebhookEndpoint(Base):
    """A URL that receives the event types it subscribed to, signed with its secret.

    ``implicit`` marks the endpoint made from ``TOKENLEDGER_ALERT_WEBHOOK_URL``. A removed
    endpoint stays (its deliveries name it) with ``active`` false.
    """

    __tablename__ = "webhook_endpoints"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    url: Mapped[str] = mapped_column(Text)
    event_types: Mapped[list[str]] = mapped_column(ARRAY(String(32)))
    secret: Mapped[str] = mapped_column(String(128))
    description: Mapped[str | None] = mapped_column(String(255))
    implicit: Mapped[bool] = mapped_column(Boolean, default=False)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    removed_at: Mapped[datetime | None] = mapped_column(Timestamp)
    __table_args__ = (
        CheckConstraint("cardinality(event_types) > 0 AND event_types <@ ARRAY["
                        + ", ".join(f"'{t}'" for t in EVENT_TYPES) + "]::varchar[]",
                        name="webhook_endpoint_event_types"),
        CheckConstraint("active OR removed_at IS NOT NULL", name="webhook_endpoint_removed"),
        # At most one live implicit endpoint per URL, however many processes ensure it.
        Index("uq_webhook_endpoint_implicit", "url", unique=True,
              postgresql_where=text("implicit AND active")),
    )


class WebhookDelivery(Base):
    """One event for one endpoint: pending until delivered, failed or cancelled."""

    __tablename__ = "webhook_deliveries"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    webhook_id: Mapped[str] = mapped_column(String(64), unique=True)
    endpoint_id: Mapped[int] = mapped_column(ForeignKey("webhook_endpoints.id"))
    event_type: Mapped[str] = mapped_column(String(32))
    # Whom or what the event is about (a user id, "run:<id>", "dead_letter:<id>"), so an
    # erasure finds the deliveries naming a user.
    subject: Mapped[str | None] = mapped_column(String(255))
    payload: Mapped[dict[str, Any]] = mapped_column(Json)
    status: Mapped[str] = mapped_column(String(16), default=PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(Timestamp)
    last_attempt_at: Mapped[datetime | None] = mapped_column(Timestamp)
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    delivered_at: Mapped[datetime | None] = mapped_column(Timestamp)
    __table_args__ = (
        CheckConstraint(one_of("status", DELIVERY_STATUSES), name="webhook_delivery_status"),
        CheckConstraint(one_of("event_type", EVENT_TYPES), name="webhook_delivery_type"),
        Index("ix_webhook_deliveries_due", "next_attempt_at",
              postgresql_where=text("status = 'pending'")),
        Index("ix_webhook_deliveries_subject", "subject"),
        Index("ix_webhook_deliveries_endpoint", "endpoint_id", "id"),
        Index("ix_webhook_deliveries_created", "created_at"),
    )


class WebhookTimer(Base):
    """When a relay run is already scheduled to wake (one row): the next retry's time is
    armed once, however many runs see it coming."""

    __tablename__ = "webhook_timer"
    id: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    wake_at: Mapped[datetime | None] = mapped_column(Timestamp)
    __table_args__ = (CheckConstraint("id = 1", name="webhook_timer_one_row"),)
