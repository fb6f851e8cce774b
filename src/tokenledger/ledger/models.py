"""The ledger's tables: accounts, wallets, entries, outcomes and conflicts.

Invariants live here as constraints, not only in code.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from tokenledger.db.base import Base, BigId, Json, Timestamp, one_of

CARRY_FORWARD = "CARRY_FORWARD"
ENTRY_TYPES = (
    "CHARGE", "REFUND", "CREDIT", "OPEN", "DAILY_RESET", "RENEWAL",
    "EXPIRY", "HOLD", "HOLD_RELEASE", "ADJUSTMENT", CARRY_FORWARD,
)
OUTCOMES = ("applied", "declined", "rejected")
STANDARD = "STANDARD"


class Account(Base):
    """One user of the calling application, named by the caller's own user_id."""

    __tablename__ = "accounts"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    user_id: Mapped[str] = mapped_column(String(128), unique=True)
    plan_code: Mapped[str] = mapped_column(ForeignKey("plans.code"))
    timezone: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    last_renewal_at: Mapped[datetime | None] = mapped_column(Timestamp)
    last_reset_on: Mapped[str | None] = mapped_column(String(10))
    # Set by `accounts close`: charges and starts are refused from then on (migration 0013).
    closed_at: Mapped[datetime | None] = mapped_column(Timestamp)


class Wallet(Base):
    """A pot of credits of one type; the account balance is the sum of its live wallets."""

    __tablename__ = "wallets"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"))
    wallet_type: Mapped[str] = mapped_column(String(32))
    balance: Mapped[int] = mapped_column(BigInteger, default=0)
    expires_at: Mapped[datetime | None] = mapped_column(Timestamp)
    is_active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    __table_args__ = (
        # Only the STANDARD wallet may overdraw (allow_overdraft); others never go below 0.
        CheckConstraint(f"wallet_type = '{STANDARD}' OR balance >= 0", name="wallet_non_negative"),
        CheckConstraint(f"wallet_type <> '{STANDARD}' OR expires_at IS NULL",
                        name="standard_never_expires"),
        Index("uq_wallet_no_expiry", "account_id", "wallet_type", unique=True,
              postgresql_where=text("expires_at IS NULL")),
        Index("uq_wallet_expiry", "account_id", "wallet_type", "expires_at", unique=True,
              postgresql_where=text("expires_at IS NOT NULL")),
        # Lookups by account, and the target of ledger entries' (account, wallet) key.
        UniqueConstraint("account_id", "id", name="uq_wallet_account_id"),
    )


class LedgerEntry(Base):
    """One append-only change to one wallet. The wallet's balance is the sum of these."""

    __tablename__ = "ledger_entries"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
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
    created_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    __table_args__ = (
        CheckConstraint("balance_after = balance_before + amount", name="entry_arithmetic"),
        CheckConstraint("amount <> 0", name="entry_non_zero"),
        CheckConstraint(one_of("type", ENTRY_TYPES), name="entry_type"),
        # One event touches a wallet at most once per entry type: a key applied twice
        # cannot be written twice.
        UniqueConstraint("event_key", "wallet_id", "type", name="uq_entry_event_wallet_type"),
        # The wallet must exist AND belong to the entry's account. Migration 0007 replaces
        # this foreign key with a check once per statement and a trigger that keeps
        # wallets from being deleted or moved (docs/performance.md).
        ForeignKeyConstraint(["account_id", "wallet_id"], ["wallets.account_id", "wallets.id"],
                             name="fk_entry_wallet_of_account"),
        Index("ix_entries_account_id", "account_id", "id"),
        Index("ix_entries_reference", "reference", postgresql_where=text("reference IS NOT NULL")),
        # Reads by time over every account (the dashboard): migration 0012.
        Index("ix_entries_created_brin", "created_at", postgresql_using="brin",
              postgresql_with={"autosummarize": "on"}),
    )


class EventOutcome(Base):
    """The idempotency record: stored in the same transaction as the event's effect."""

    __tablename__ = "event_outcomes"
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    payload_hash: Mapped[str] = mapped_column(String(64))
    user_id: Mapped[str] = mapped_column(String(128))
    event_type: Mapped[str] = mapped_column(String(32))
    outcome: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    result: Mapped[dict[str, Any] | None] = mapped_column(Json)
    created_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    # The message that first applied the key (its publisher reads "applied", any other
    # publish of the key a replay).
    message_id: Mapped[str | None] = mapped_column(String(64, collation="C"))
    __table_args__ = (
        CheckConstraint(one_of("outcome", OUTCOMES), name="outcome_kind"),
        # Outcomes per minute over the last hour (the dashboard): migration 0012.
        Index("ix_outcomes_created_brin", "created_at", postgresql_using="brin",
              postgresql_with={"autosummarize": "on"}),
    )


class EventConflict(Base):
    """A key reused with a different payload: recorded, never applied."""

    __tablename__ = "event_conflicts"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    key: Mapped[str] = mapped_column(String(255), index=True)
    payload_hash: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]] = mapped_column(Json)
    seen_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    __table_args__ = (UniqueConstraint("key", "payload_hash", name="uq_conflict_key_hash"),)
