"""The api_keys table: a lookup prefix and the SHA-256 of the secret, never the secret."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import CheckConstraint, String, func
from sqlalchemy.orm import Mapped, mapped_column

from tokenledger.db.base import Base, BigId, Timestamp

SCOPES = ("producer", "reader", "admin")


class ApiKey(Base):
    """A server API key. The full key is shown once at creation and cannot be recovered."""

    __tablename__ = "api_keys"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    secret_hash: Mapped[str] = mapped_column(String(64))
    scope: Mapped[str] = mapped_column(String(16))
    name: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    revoked_at: Mapped[datetime | None] = mapped_column(Timestamp)
    __table_args__ = (
        CheckConstraint("scope IN ('producer', 'reader', 'admin')", name="api_key_scope"),
    )
