"""Holds: credits set aside by a token-process start until its end settles them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, CheckConstraint, ForeignKey, Index, String, func, text
from sqlalchemy.orm import Mapped, mapped_column

from tokenledger.db.base import Base, BigId, Json, Timestamp, one_of
from tokenledger.timeutil import as_utc

OPEN = "open"
HOLD_STATUSES = (OPEN, "settled", "released", "expired")


class Hold(Base):
    """Credits taken from wallets by ``HOLD`` entries at start; resolved exactly once.

    ``allocations`` lists what each wallet gave (``[{wallet_id, wallet_type, amount}]``) so
    the release can give each wallet its part back. ``key`` is the event key of the hold's
    ``HOLD`` and ``HOLD_RELEASE`` entries: the ledger's unique (event_key, wallet, type)
    then makes a second release of the same hold impossible to write.
    """

    __tablename__ = "holds"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    key: Mapped[str] = mapped_column(String(255), unique=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"))
    user_id: Mapped[str] = mapped_column(String(128))
    feature: Mapped[str] = mapped_column(String(128))
    model: Mapped[str | None] = mapped_column(String(128))
    amount: Mapped[int] = mapped_column(BigInteger)
    allocations: Mapped[list[dict[str, Any]]] = mapped_column(Json)
    status: Mapped[str] = mapped_column(String(16), default=OPEN)
    expires_at: Mapped[datetime] = mapped_column(Timestamp)
    created_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    resolved_at: Mapped[datetime | None] = mapped_column(Timestamp)
    resolved_by: Mapped[str | None] = mapped_column(String(255))
    __table_args__ = (
        CheckConstraint("amount >= 0", name="hold_amount"),
        CheckConstraint(one_of("status", HOLD_STATUSES), name="hold_status"),
        # Open exactly when unresolved: a resolved hold always says when.
        CheckConstraint("(status = 'open' AND resolved_at IS NULL)"
                        " OR (status <> 'open' AND resolved_at IS NOT NULL)",
                        name="hold_resolution"),
        Index("ix_holds_account", "account_id", "status"),
        Index("ix_holds_open_expiry", "expires_at",
              postgresql_where=text("status = 'open'")),
    )


@dataclass(slots=True)
class HoldState:
    """A hold as a batch sees it after locking its account."""

    id: int
    key: str
    account_id: int
    feature: str
    model: str | None
    amount: int
    allocations: list[dict[str, Any]]
    status: str
    expires_at: datetime
    resolved_by: str | None = None

    @classmethod
    def from_row(cls, row: Any) -> HoldState:
        return cls(row.id, row.key, row.account_id, row.feature, row.model, row.amount,
                   list(row.allocations or []), row.status, as_utc(row.expires_at),
                   row.resolved_by)
