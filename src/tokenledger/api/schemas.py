"""Request and response shapes of the HTTP API, with the seeds' field names.

Every string that reaches the database is checked here for NUL characters and lone
surrogates (PostgreSQL refuses both, and a refusal there would be a 500, not a 422).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
)
from pydantic.alias_generators import to_camel

from tokenledger.messages import MAX_AMOUNT, MAX_BATCH, MAX_METADATA_BYTES
from tokenledger.models import ENTRY_TYPES

T = TypeVar("T")
MAX_BIGINT = 2**63 - 1
MAX_TOKENS = 10**10


def clean_text(value: str) -> str:
    """Refuse control characters and lone surrogates (not storable in PostgreSQL)."""
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("must not contain control characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text") from None
    return value


def check_json(value: Any, depth: int = 0) -> None:
    """Refuse JSON that PostgreSQL's jsonb cannot store: \\u0000, lone surrogates, depth."""
    if depth > 32:
        raise ValueError("is nested too deeply (at most 32 levels)")
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError("must not contain NUL characters")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("must be valid Unicode text") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            check_json(k, depth + 1)
            check_json(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            check_json(v, depth + 1)
    elif isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        raise ValueError("must not contain NaN or infinity")


def _metadata(value: dict[str, Any] | None) -> dict[str, Any] | None:
    if value is None:
        return value
    check_json(value)
    import json

    if len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()) \
            > MAX_METADATA_BYTES:
        raise ValueError(f"must be at most {MAX_METADATA_BYTES} bytes of JSON")
    return value


def aware(value: datetime | None) -> datetime | None:
    """Naive datetimes are UTC; years outside 1970-9998 are refused."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    if not 1970 <= value.year <= 9998:
        raise ValueError("year must be between 1970 and 9998")
    return value.astimezone(UTC)


Text = Annotated[str, AfterValidator(clean_text)]
UserId = Annotated[str, Field(min_length=1, max_length=128), AfterValidator(clean_text)]
Code = Annotated[str, Field(min_length=1, max_length=128), AfterValidator(clean_text)]
Key = Annotated[str, Field(min_length=1, max_length=255), AfterValidator(clean_text)]
Amount = Annotated[StrictInt, Field(gt=0, le=MAX_AMOUNT)]
TokenCount = Annotated[StrictInt, Field(ge=0, le=MAX_TOKENS)]
WalletType = Annotated[str, Field(pattern=r"^[A-Z][A-Z0-9_]{0,31}$")]
Metadata = Annotated[dict[str, Any] | None, AfterValidator(_metadata)]
When = Annotated[datetime, AfterValidator(aware)]
EntryType = Literal[ENTRY_TYPES]  # type: ignore[valid-type]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Camel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)


# -- envelope and errors -------------------------------------------------------------------


class Envelope(BaseModel, Generic[T]):
    """Every answer: ``{"success", "message", "data"}``."""

    success: bool = True
    message: str | None = None
    data: T


class FieldError(BaseModel):
    field: str = Field(description="Dotted path of the offending field, e.g. `events.3.amount`")
    location: str = Field(description="body, query, path or header")
    message: str
    type: str


class ErrorBody(BaseModel):
    """Every error: ``{"success": false, "status", "message"}`` (+ ``errors`` on 422)."""

    success: Literal[False] = False
    status: int
    message: str
    errors: list[FieldError] | None = None


# -- billing ------------------------------------------------------------------------------


class WalletOut(_Camel):
    id: int
    balance_tokens: int
    wallet_type: str
    is_active: bool
    expires_at: datetime | None


class BalanceOut(_Camel):
    user_id: str
    plan: str
    balance: int = Field(description="Total over live wallets (seed 000)")
    available: int = Field(description="What a charge may draw now without overdraft")
    can_create_project: bool
    required_tokens: int = Field(description="The `project_creation` feature's cost")
    wallets: list[WalletOut]


class WalletsOut(_Camel):
    user_id: str
    total_balance: int
    wallets: list[WalletOut]
    can_create_project: bool
    required_tokens: int


class CreateWalletIn(_Strict):
    user_id: UserId
    walletType: WalletType = "PREMIUM"  # noqa: N815 - the seed's field names
    initialTokens: Amount  # noqa: N815
    expiresAt: When | None = None  # noqa: N815
    key: Key | None = None
    reason: Annotated[str, Field(max_length=255), AfterValidator(clean_text)] | None = None


class CreatedWalletOut(_Camel):
    key: str
    status: str
    wallet: WalletOut | None
    total_balance: int | None


class TransactionOut(_Camel):
    id: int
    user_id: str
    wallet_id: int
    wallet_type: str
    amount: int
    balance_before: int
    balance_after: int
    type: str
    feature: str | None
    description: str
    event_key: str | None
    reference: str | None
    metadata: dict[str, Any] | None
    created_at: datetime


class CanAffordOut(_Camel):
    user_id: str
    feature: str
    can_afford: bool
    cost: int
    balance: int
    available: int
    deficit: int
    reason: str | None


# -- token process ------------------------------------------------------------------------


class StartIn(_Strict):
    user_id: UserId
    feature_endpoint_id: Code
    max_output_tokens: TokenCount | None = None
    hold: Annotated[StrictInt, Field(ge=0, le=MAX_AMOUNT)] | None = None
    model: Code | None = None


class StartOut(BaseModel):
    user_id: str
    token: int = Field(description="Current (available) token balance")
    status: Literal["accessible", "not-accessible"]
    message: str | None = None
    cost: int | None = Field(None, description="Credits held for this process")
    hold_id: int | None = None


class EndIn(_Strict):
    user_id: UserId
    feature_endpoint_id: Code
    input_token: TokenCount = Field(validation_alias=AliasChoices("input_token", "input_tokens"))
    output_token: TokenCount = Field(
        validation_alias=AliasChoices("output_token", "output_tokens"))
    model: Code | None = None
    hold_id: Annotated[StrictInt, Field(gt=0, le=MAX_BIGINT)] | None = None
    key: Key | None = None
    metadata: Metadata = None


class EndOut(BaseModel):
    user_id: str
    key: str
    token: int | None = Field(None, description="Updated token balance")
    cost: int | None = Field(None, description="Final cost (after profit)")
    status: str = Field(description="returnable | not-returnable, or the event's outcome")
    message: str | None = None
    hold_id: int | None = None


# -- events -------------------------------------------------------------------------------


class AcceptedOut(BaseModel):
    keys: list[str]
    count: int


class EventOutcomeOut(BaseModel):
    key: str
    status: str = Field(description="applied | declined | rejected | dead_lettered | pending")
    reason: str | None = None
    result: dict[str, Any] = {}


# -- accounts and reports -----------------------------------------------------------------


class OpenAccountIn(_Strict):
    user_id: UserId
    plan: Annotated[str, Field(min_length=1, max_length=64), AfterValidator(clean_text)] | None \
        = None
    timezone: Annotated[str, Field(min_length=1, max_length=64),
                        AfterValidator(clean_text)] | None = None


class AccountOut(_Camel):
    user_id: str
    plan: str
    timezone: str
    created: bool
    balance: int
    wallets: list[WalletOut]


class FeatureStats(_Camel):
    operations: int
    spent: int
    refunded: int
    net_spent: int


class ModelStats(_Camel):
    operations: int
    input_tokens: int
    output_tokens: int
    credits_charged: int = Field(description="Credits actually taken")
    exact_cost: float = Field(description="Unrounded price in credits, markup included")
    base_credits: float = Field(description="The price before the profit markup")
    margin_credits: float = Field(description="credits_charged - base_credits")
    provider_cost: float = Field(description="What the provider charged (catalog currency)")
    priced: int = Field(description="Operations that recorded a provider cost")


class Margin(_Camel):
    credits_charged: int
    base_credits: float
    margin_credits: float
    margin_percent: float
    provider_cost: float
    credit_value: float | None = Field(description="Currency per credit, when given")
    revenue: float | None
    margin_value: float | None = Field(description="revenue - provider_cost")
    margin_value_percent: float | None


class Summary(_Camel):
    total_spent: int
    total_refunded: int
    net_spent: int
    total_earned: int
    total_removed: int
    net_change: int
    operation_count: int
    average_per_operation: float


class StatisticsOut(Summary):
    user_id: str
    start: datetime | None
    end: datetime | None
    by_type: dict[str, int]
    by_feature: dict[str, FeatureStats]
    by_model: dict[str, ModelStats]
    margin: Margin


class Period(_Camel):
    start: datetime
    end: datetime
    timezone: str


class DaySpend(_Camel):
    spent: int
    refunded: int


class MonthlyReportOut(_Camel):
    user_id: str
    month: str
    period: Period
    opening_balance: int
    closing_balance: int
    summary: Summary
    breakdown: dict[str, FeatureStats]
    by_model: dict[str, ModelStats]
    margin: Margin
    daily: dict[str, DaySpend]


# -- admin --------------------------------------------------------------------------------


class RunIn(_Strict):
    tier: Annotated[str, Field(min_length=1, max_length=64), AfterValidator(clean_text)] | None \
        = None
    limit: Annotated[StrictInt, Field(gt=0, le=10_000_000)] | None = None
    dry_run: StrictBool = False
    continue_on_error: StrictBool = True


class RenewalRunIn(RunIn):
    kind: Literal["monthly", "daily"] = "monthly"


def batch_limit() -> int:
    return MAX_BATCH
