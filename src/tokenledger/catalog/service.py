"""The catalog: plans (tiers), features and model prices, from TOML into the database.

Domain code reads it as an immutable :class:`Catalog` (``uow.catalog``), cached per
process and re-checked against the newest stored version at most once a second.
"""

from __future__ import annotations

import json
import threading
import time
import tomllib
from dataclasses import dataclass, field
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from tokenledger.catalog.models import CatalogVersion, Feature, ModelPrice, Plan
from tokenledger.errors import CatalogError
from tokenledger.ledger.models import STANDARD, Account
from tokenledger.messages import WalletType, describe

NonNeg = Annotated[int, Field(ge=0)]
# The wallet types a catalog declares when it names none: every credit and preferred
# wallet type must be one of the catalog's, so a typo never opens a wallet of its own.
DEFAULT_WALLET_TYPES = ("STANDARD", "PREMIUM", "PROMO")


class PlanSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    allocation: NonNeg
    opening_tokens: NonNeg | None = None
    period: Literal["daily", "30d"]
    renewal_mode: Literal["reset", "topup"] = "reset"
    rollover_cap: NonNeg | None = None
    low_balance_threshold: NonNeg | None = None
    features: list[str] = ["*"]


class FeatureSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    pricing: Literal["fixed", "usage"] = "fixed"
    cost: NonNeg = 0
    min_cost: NonNeg = 0
    allow_overdraft: bool = False
    default_model: str | None = None
    description: str | None = None
    # An end whose provider reported no usage: charge what was held, or release it.
    on_incomplete: Literal["charge_hold", "release"] = "charge_hold"


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    input_weight: Annotated[Decimal, Field(ge=0)] = Decimal(1)
    output_weight: Annotated[Decimal, Field(ge=0)] = Decimal(4)
    tokens_per_credit: Annotated[Decimal, Field(gt=0)]
    profit_percent: Annotated[Decimal, Field(ge=0)] = Decimal(0)
    provider_input_per_1k: Annotated[Decimal, Field(ge=0)] | None = None
    provider_output_per_1k: Annotated[Decimal, Field(ge=0)] | None = None


class CatalogSpec(BaseModel):
    """A whole catalog file, checked for internal consistency."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    default_plan: str
    plans: dict[str, PlanSpec]
    features: dict[str, FeatureSpec] = {}
    models: dict[str, ModelSpec] = {}
    wallet_types: list[WalletType] = list(DEFAULT_WALLET_TYPES)

    @model_validator(mode="after")
    def _consistent(self) -> CatalogSpec:
        if self.default_plan not in self.plans:
            raise ValueError(f"default_plan {self.default_plan!r} is not among the plans")
        if STANDARD not in self.wallet_types:
            raise ValueError(f"wallet_types: must include {STANDARD} (the plan's wallet)")
        for code, plan in self.plans.items():
            for feat in plan.features:
                if feat != "*" and feat not in self.features:
                    raise ValueError(f"plans.{code}.features: unknown feature {feat!r}")
        for code, feat in self.features.items():
            if feat.pricing == "usage" and feat.default_model is None and not self.models:
                raise ValueError(f"features.{code}: a usage-priced feature needs a model price")
            if feat.default_model is not None and feat.default_model not in self.models:
                raise ValueError(f"features.{code}.default_model: unknown model "
                                 f"{feat.default_model!r}")
        return self


@dataclass(frozen=True)
class Catalog:
    """The catalog as the domain reads it: immutable, cached per process by version."""

    version: int
    default_plan: str
    plans: dict[str, PlanSpec]
    features: dict[str, FeatureSpec]
    models: dict[str, ModelSpec] = field(default_factory=dict)
    wallet_types: tuple[str, ...] = DEFAULT_WALLET_TYPES

    def plan_includes(self, plan_code: str, feature: str) -> bool:
        plan = self.plans.get(plan_code)
        return plan is not None and ("*" in plan.features or feature in plan.features)

    def check_plan(self, plan_code: str) -> None:
        """Refuse (ValueError naming the known ones) a plan the catalog does not have."""
        if plan_code not in self.plans:
            raise ValueError(f"unknown plan {plan_code!r}; one of "
                             f"{', '.join(sorted(self.plans))}")

    def check_wallet_type(self, wallet_type: str) -> None:
        """Refuse (ValueError naming the known ones) a type the catalog does not declare."""
        if wallet_type not in self.wallet_types:
            raise ValueError(f"unknown wallet type {wallet_type!r} (the catalog declares "
                             f"{', '.join(self.wallet_types)})")

    def check_model(self, model: str | None) -> None:
        """Refuse (ValueError naming the known ones) a model the catalog has no price for,
        rather than price it silently with the feature's default."""
        if model is not None and model not in self.models:
            raise ValueError(f"unknown model {model!r} (the catalog prices "
                             f"{', '.join(sorted(self.models))})")


def parse_catalog(text: str, source: str = "<catalog>") -> CatalogSpec:
    """Parse and validate catalog TOML (or JSON: a catalog merged with a price table is
    stored as JSON, see ``catalog.prices``); raises CatalogError naming the bad entry."""
    try:
        data = json.loads(text) if text.lstrip().startswith("{") else tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(f"{source}: not valid TOML: {exc}") from None
    except ValueError as exc:
        raise CatalogError(f"{source}: not valid JSON: {exc}") from None
    try:
        return CatalogSpec.model_validate(data)
    except ValidationError as exc:
        raise CatalogError(f"{source}: {describe(exc)}") from None


def default_catalog_text() -> str:
    return resources.files("tokenledger.catalog").joinpath("default.toml").read_text("utf-8")


def read_catalog_source(path: Path | None) -> tuple[str, str]:
    """The catalog text and a name for it: the given file, or the packaged default."""
    if path is None:
        return default_catalog_text(), "packaged default"
    try:
        return Path(path).read_text("utf-8"), str(path)
    except OSError as exc:
        raise CatalogError(f"{path}: cannot read: {exc.strerror}") from None


def store_catalog(session: Session, spec: CatalogSpec, text: str, source: str) -> int:
    """Replace the catalog in one transaction; refuses to drop a plan accounts still use."""
    in_use = set(session.scalars(select(Account.plan_code).distinct()))
    missing = sorted(in_use - set(spec.plans))
    if missing:
        raise CatalogError(f"{source}: plans still used by accounts are missing: {missing}")
    existing = {p.code: p for p in session.scalars(select(Plan))}
    for code, plan in spec.plans.items():
        row = existing.get(code) or Plan(code=code)
        row.allocation = plan.allocation
        row.opening_tokens = plan.allocation if plan.opening_tokens is None else plan.opening_tokens
        row.period = plan.period
        row.renewal_mode = plan.renewal_mode
        row.rollover_cap = plan.rollover_cap
        row.low_balance_threshold = plan.low_balance_threshold
        row.features = list(plan.features)
        session.add(row)
    for code, row in existing.items():
        if code not in spec.plans:
            session.delete(row)
    session.execute(delete(Feature))
    session.execute(delete(ModelPrice))
    session.add_all(Feature(code=c, **f.model_dump()) for c, f in spec.features.items())
    session.add_all(ModelPrice(model=m, **p.model_dump()) for m, p in spec.models.items())
    version = CatalogVersion(source=source, default_plan=spec.default_plan, document=text)
    session.add(version)
    session.flush()
    bind = session.get_bind()
    with _cache_lock:  # this process sees its own load at once
        _cache.pop(str(getattr(bind, "engine", bind).url), None)
    return version.id


def catalog_changes(old: Catalog | None, new: CatalogSpec) -> dict[str, dict[str, list[str]]]:
    """What a new catalog adds, removes and changes, per section (for `catalog load`)."""
    changes: dict[str, dict[str, list[str]]] = {}
    for section in ("plans", "features", "models"):
        before = getattr(old, section) if old is not None else {}
        after = getattr(new, section)
        changes[section] = {
            "added": sorted(set(after) - set(before)),
            "removed": sorted(set(before) - set(after)),
            "changed": sorted(k for k in set(before) & set(after) if before[k] != after[k]),
        }
    return changes


def load_catalog(session: Session, text: str, source: str) -> int:
    """Validate a catalog and store it as the newest version; returns the version.

    Raises CatalogError naming the entry and stores nothing when the file is invalid,
    drops a plan that accounts use, or drops a feature that open holds still wait on.
    Workers switch to it on their next batch (they check the version).
    """
    from tokenledger.tokenprocess.models import OPEN, Hold

    spec = parse_catalog(text, source)
    held = set(session.scalars(select(Hold.feature).where(Hold.status == OPEN).distinct()))
    missing = sorted(held - set(spec.features))
    if missing:
        raise CatalogError(f"{source}: features with open token-process holds are missing: "
                           f"{missing} (wait for them to end or expire)")
    return store_catalog(session, spec, text, source)


def ensure_catalog(session: Session, path: Path | None) -> int | None:
    """Load the configured catalog if the database has none yet. Safe to run twice."""
    if session.scalar(select(func.count()).select_from(CatalogVersion)):
        return None
    text, source = read_catalog_source(path)
    return store_catalog(session, parse_catalog(text, source), text, source)


# Per-process cache: (catalog, when its version was last checked). Checking the version
# costs a round trip on every transaction; once a second is enough for a catalog change
# to reach every worker and API process.
REFRESH_SECONDS = 1.0
_cache: dict[str, tuple[Catalog, float]] = {}
_cache_lock = threading.Lock()


def cached_catalog(settings: Any) -> Catalog | None:
    """The catalog this process read last for ``settings``' database, if any (no I/O)."""
    from tokenledger.db.engine import get_engine

    engine = get_engine(settings.ledger_url())
    with _cache_lock:
        cached = _cache.get(str(engine.url))
    return cached[0] if cached is not None else None


def current_catalog(session: Session) -> Catalog:
    """The newest stored catalog; a newly loaded one is seen within REFRESH_SECONDS."""
    bind = session.get_bind()
    cache_key = str(getattr(bind, "engine", bind).url)
    now = time.monotonic()
    with _cache_lock:
        cached = _cache.get(cache_key)
    if cached is not None and now - cached[1] < REFRESH_SECONDS:
        return cached[0]
    version = session.scalar(select(func.max(CatalogVersion.id)))
    if version is None:
        raise CatalogError("no catalog loaded: run `tokenledger migrate`")
    if cached is not None and cached[0].version == version:
        catalog = cached[0]
    else:
        row = session.execute(select(CatalogVersion.document, CatalogVersion.source)
                              .where(CatalogVersion.id == version)).one()
        spec = parse_catalog(row.document, row.source)
        catalog = Catalog(version, spec.default_plan, dict(spec.plans), dict(spec.features),
                          dict(spec.models), tuple(spec.wallet_types))
    with _cache_lock:
        _cache[cache_key] = (catalog, now)
    return catalog
