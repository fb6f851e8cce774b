"""Retention runs, the archive of what they removed, and the erasure log.

The archive keeps every entry a compaction folded into a carry-forward, as it was, with
the carry-forward it went into (``carried_into``): ``verify`` checks that each
carry-forward equals the sum of its archived entries. Idempotency outcomes pruned after
their grace are archived too. The erasure log names the pseudonym, never the user.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Boolean, CheckConstraint, Index, String, Text, func
from sqlalchemy.orm import Mapped, mapped_column

from tokenledger.db.base import Base, BigId, Json, Timestamp, one_of

RUN_STATUSES = ("running", "completed", "failed")


class RetentionRun(Base):
    """One compaction: its cut-offs and what it folded, archived and pruned."""

    __tablename__ = "retention_runs"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    # Entries dated before ``cutoff`` are folded; outcomes before ``key_cutoff`` pruned.
    cutoff: Mapped[datetime] = mapped_column(Timestamp)
    key_cutoff: Mapped[datetime] = mapped_column(Timestamp)
    dry_run: Mapped[bool] = mapped_column(Boolean, default=False)
    trigger: Mapped[str] = mapped_column(String(16), default="cli")
    status: Mapped[str] = mapped_column(String(16), default="running")
    accounts: Mapped[int] = mapped_column(BigInteger, default=0)
    wallets: Mapped[int] = mapped_column(BigInteger, default=0)
    entries_archived: Mapped[int] = mapped_column(BigInteger, default=0)
    carry_forwards: Mapped[int] = mapped_column(BigInteger, default=0)
    outcomes_archived: Mapped[int] = mapped_column(BigInteger, default=0)
    deliveries_deleted: Mapped[int] = mapped_column(BigInteger, default=0)
    message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    finished_at: Mapped[datetime | None] = mapped_column(Timestamp)
    __table_args__ = (
        CheckConstraint(one_of("status", RUN_STATUSES), name="retention_run_status"),
        CheckConstraint("key_cutoff <= cutoff", name="retention_run_key_cutoff"),
    )


class ArchivedEntry(Base):
    """A ledger entry a compaction removed, exactly as it was."""

    __tablename__ = "ledger_entries_archive"
    entry_id: Mapped[int] = mapped_column(BigId, primary_key=True)
    run_id: Mapped[int] = mapped_column(BigId, primary_key=True)
    account_id: Mapped[int] = mapped_column(BigId)
    wallet_id: Mapped[int] = mapped_column(BigId)
    amount: Mapped[int] = mapped_column(BigInteger)
    balance_before: Mapped[int] = mapped_column(BigInteger)
    balance_after: Mapped[int] = mapped_column(BigInteger)
    type: Mapped[str] = mapped_column(String(16))
    feature: Mapped[str | None] = mapped_column(String(128))
    event_key: Mapped[str | None] = mapped_column(String(255))
    reference: Mapped[str | None] = mapped_column(String(255))
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", Json)
    created_at: Mapped[datetime] = mapped_column(Timestamp)
    # The CARRY_FORWARD entry this one was folded into (None: its wallet's old entries
    # summed to zero, so none was written).
    carried_into: Mapped[int | None] = mapped_column(BigId)
    archived_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    __table_args__ = (
        Index("ix_entries_archive_account", "account_id"),
        Index("ix_entries_archive_carried", "carried_into"),
    )


class ArchivedOutcome(Base):
    """An idempotency outcome pruned after its grace: its key is no longer recognized."""

    __tablename__ = "event_outcomes_archive"
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    run_id: Mapped[int] = mapped_column(BigId, primary_key=True)
    payload_hash: Mapped[str] = mapped_column(String(64))
    user_id: Mapped[str] = mapped_column(String(128))
    event_type: Mapped[str] = mapped_column(String(32))
    outcome: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    result: Mapped[dict[str, Any] | None] = mapped_column(Json)
    created_at: Mapped[datetime] = mapped_column(Timestamp)
    archived_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    __table_args__ = (Index("ix_outcomes_archive_user", "user_id"),)


class Erasure(Base):
    """That an account was erased, when, by whom and under which pseudonym (no user id)."""

    __tablename__ = "erasures"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    pseudonym: Mapped[str] = mapped_column(String(128), unique=True)
    erased_at: Mapped[datetime] = mapped_column(Timestamp)
    erased_by: Mapped[str] = mapped_column(String(255))
    rows: Mapped[dict[str, int]] = mapped_column(Json)
