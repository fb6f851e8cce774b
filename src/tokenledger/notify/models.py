"""The notification state kept in the ledger database."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, CheckConstraint, ForeignKey, String, func
from sqlalchemy.orm import Mapped, mapped_column

from tokenledger.db.base import Base, Timestamp


class LowBalanceState(Base):
    """An account that was told it is low and has not gone back above its threshold.

    A row exists exactly while the account is "below": inserting it is the crossing that
    publishes ``balance_low``; deleting it re-arms the alert. Keyed by user_id because
    that is what a batch's balance changes carry: one cheap probe per batch.
    """

    __tablename__ = "low_balance_state"
    user_id: Mapped[str] = mapped_column(
        String(128), ForeignKey("accounts.user_id", ondelete="CASCADE", onupdate="CASCADE"),
        primary_key=True)
    threshold: Mapped[int] = mapped_column(BigInteger)
    balance: Mapped[int] = mapped_column(BigInteger)
    ledger_seq: Mapped[int] = mapped_column(BigInteger)
    since: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())


class AccountThreshold(Base):
    """An account's own low-balance threshold, overriding its plan's.

    Read inside the low-balance rule (``sql/low_balance.sql``) by every writer of
    balances; keyed by user_id for the same reason as ``low_balance_state``.
    """

    __tablename__ = "account_thresholds"
    user_id: Mapped[str] = mapped_column(
        String(128), ForeignKey("accounts.user_id", ondelete="CASCADE", onupdate="CASCADE"),
        primary_key=True)
    threshold: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    __table_args__ = (CheckConstraint("threshold >= 0", name="account_threshold_range"),)
