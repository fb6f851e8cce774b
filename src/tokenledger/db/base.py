"""The declarative base and the column types every domain's tables use (PostgreSQL)."""

from __future__ import annotations

from sqlalchemy import BigInteger, DateTime
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase

BigId = BigInteger()
Json = JSONB()
Timestamp = DateTime(timezone=True)


class Base(DeclarativeBase):
    pass


def one_of(column: str, values: tuple[str, ...]) -> str:
    """A CHECK expression: ``column IN ('a', 'b', ...)``."""
    return f"{column} IN ({', '.join(repr(v) for v in values)})"
