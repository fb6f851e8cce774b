"""Renewal runs and their chunks: the record of every batch of resets and renewals.

The per-account grant record is the ledger entry itself: each grant's entry is keyed
``reset:<account_id>:<local-date>`` or ``renewal:<account_id>:<period-start>`` and the
entry's unique (event_key, wallet_id, type) admits it once, beside the account's period
mark, so one account is granted at most once per period no matter how many runs, beats
or redeliveries try.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.orm import Mapped, mapped_column

from tokenledger.db.base import Base, BigId, Json, Timestamp, one_of

RUN_KINDS = ("daily", "monthly")
RUN_STATUSES = ("running", "completed", "stopped", "failed")
CHUNK_STATUSES = ("pending", "done", "skipped", "failed")


class RenewalRun(Base):
    """One batch run (daily reset or monthly renewal): its options and running totals."""

    __tablename__ = "renewal_runs"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default="running")
    trigger: Mapped[str] = mapped_column(String(16), default="cli")
    tier: Mapped[str | None] = mapped_column(String(64))
    account_limit: Mapped[int | None] = mapped_column(BigInteger)
    dry_run: Mapped[bool] = mapped_column(Boolean, default=False)
    continue_on_error: Mapped[bool] = mapped_column(Boolean, default=True)
    # Every chunk judges "due" against this instant, so a run is one consistent cut.
    as_of: Mapped[datetime] = mapped_column(Timestamp)
    chunk_size: Mapped[int] = mapped_column(Integer)
    candidates: Mapped[int] = mapped_column(BigInteger, default=0)
    total_chunks: Mapped[int] = mapped_column(Integer, default=0)
    chunks_done: Mapped[int] = mapped_column(Integer, default=0)
    total_processed: Mapped[int] = mapped_column(BigInteger, default=0)
    successful: Mapped[int] = mapped_column(BigInteger, default=0)
    failed: Mapped[int] = mapped_column(BigInteger, default=0)
    skipped: Mapped[int] = mapped_column(BigInteger, default=0)
    tokens_granted: Mapped[int] = mapped_column(BigInteger, default=0)
    errors: Mapped[list[dict[str, Any]] | None] = mapped_column(Json)
    alert: Mapped[bool] = mapped_column(Boolean, default=False)
    alert_sent_at: Mapped[datetime | None] = mapped_column(Timestamp)
    message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    finished_at: Mapped[datetime | None] = mapped_column(Timestamp)
    __table_args__ = (
        CheckConstraint(one_of("kind", RUN_KINDS), name="renewal_run_kind"),
        CheckConstraint(one_of("status", RUN_STATUSES), name="renewal_run_status"),
        CheckConstraint("chunks_done <= total_chunks", name="renewal_run_chunks"),
        Index("ix_renewal_runs_kind_created", "kind", "created_at"),
    )


class RenewalChunk(Base):
    """A keyset slice ``(after_id, upto_id]`` of a run's accounts, processed as one unit."""

    __tablename__ = "renewal_chunks"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("renewal_runs.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)
    after_id: Mapped[int] = mapped_column(BigInteger)
    upto_id: Mapped[int] = mapped_column(BigInteger)
    planned: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    processed: Mapped[int] = mapped_column(Integer, default=0)
    successful: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    skipped: Mapped[int] = mapped_column(Integer, default=0)
    tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    errors: Mapped[list[dict[str, Any]] | None] = mapped_column(Json)
    changes: Mapped[list[dict[str, Any]] | None] = mapped_column(Json)
    finished_at: Mapped[datetime | None] = mapped_column(Timestamp)
    __table_args__ = (
        CheckConstraint(one_of("status", CHUNK_STATUSES), name="renewal_chunk_status"),
        CheckConstraint("after_id < upto_id", name="renewal_chunk_range"),
        UniqueConstraint("run_id", "seq", name="uq_renewal_chunk_seq"),
    )
