"""The catalog's tables: plans (tiers), features, model prices and catalog versions."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Boolean, CheckConstraint, Numeric, String, Text, func
from sqlalchemy.orm import Mapped, mapped_column

from tokenledger.db.base import Base, BigId, Json, Timestamp, one_of


class Plan(Base):
    """A tier: what it grants, how often, and which features it includes."""

    __tablename__ = "plans"
    code: Mapped[str] = mapped_column(String(64), primary_key=True)
    allocation: Mapped[int] = mapped_column(BigInteger)
    opening_tokens: Mapped[int] = mapped_column(BigInteger)
    period: Mapped[str] = mapped_column(String(16))
    renewal_mode: Mapped[str] = mapped_column(String(16))
    rollover_cap: Mapped[int | None] = mapped_column(BigInteger)
    low_balance_threshold: Mapped[int | None] = mapped_column(BigInteger)
    features: Mapped[list[str]] = mapped_column(Json)
    __table_args__ = (
        CheckConstraint("allocation >= 0 AND opening_tokens >= 0", name="plan_amounts"),
        CheckConstraint(one_of("period", ("daily", "30d")), name="plan_period"),
        CheckConstraint(one_of("renewal_mode", ("reset", "topup")), name="plan_mode"),
    )


class Feature(Base):
    """Something an account pays for: a fixed cost, or priced from model usage."""

    __tablename__ = "features"
    code: Mapped[str] = mapped_column(String(128), primary_key=True)
    pricing: Mapped[str] = mapped_column(String(16))
    cost: Mapped[int] = mapped_column(BigInteger)
    min_cost: Mapped[int] = mapped_column(BigInteger)
    allow_overdraft: Mapped[bool] = mapped_column(Boolean)
    default_model: Mapped[str | None] = mapped_column(String(128))
    description: Mapped[str | None] = mapped_column(Text)
    on_incomplete: Mapped[str] = mapped_column(String(16), default="charge_hold",
                                               server_default="charge_hold")
    __table_args__ = (
        CheckConstraint("cost >= 0 AND min_cost >= 0", name="feature_costs"),
        CheckConstraint(one_of("pricing", ("fixed", "usage")), name="feature_pricing"),
        CheckConstraint(one_of("on_incomplete", ("charge_hold", "release")),
                        name="feature_on_incomplete"),
    )


class ModelPrice(Base):
    """How one LLM's input and output tokens turn into credits."""

    __tablename__ = "model_prices"
    model: Mapped[str] = mapped_column(String(128), primary_key=True)
    input_weight: Mapped[Any] = mapped_column(Numeric(12, 4))
    output_weight: Mapped[Any] = mapped_column(Numeric(12, 4))
    tokens_per_credit: Mapped[Any] = mapped_column(Numeric(14, 4))
    profit_percent: Mapped[Any] = mapped_column(Numeric(8, 3))
    provider_input_per_1k: Mapped[Any | None] = mapped_column(Numeric(14, 8))
    provider_output_per_1k: Mapped[Any | None] = mapped_column(Numeric(14, 8))
    __table_args__ = (CheckConstraint("tokens_per_credit > 0", name="price_tpc"),)


class CatalogVersion(Base):
    """Bumped on every catalog load so long-lived workers know to re-read it."""

    __tablename__ = "catalog_versions"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    source: Mapped[str] = mapped_column(Text)
    default_plan: Mapped[str] = mapped_column(String(64))
    document: Mapped[str] = mapped_column(Text)
    loaded_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
