"""The dead-letter store's table: messages that could not be applied."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Integer, String, Text, func
from sqlalchemy.orm import Mapped, mapped_column

from tokenledger.db.base import Base, BigId, Timestamp


class DeadLetter(Base):
    """A message that could not be applied, kept with the reason until retried or dropped."""

    __tablename__ = "dead_letters"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    fingerprint: Mapped[str] = mapped_column(String(64), unique=True)
    key: Mapped[str | None] = mapped_column(String(255), index=True)
    payload: Mapped[str] = mapped_column(Text)
    reason: Mapped[str] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=1)
    first_seen: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    last_seen: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
