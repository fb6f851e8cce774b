"""Request and response shapes of the HTTP API, with the seeds' field names.

Field types come from ``tokenledger.messages``: one rule per field for the SDK, the CLI,
the workers and the API (a string PostgreSQL cannot store is a 422, never a 500).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
)
from pydantic.alias_generators import to_camel

from tokenledger.ledger.models import ENTRY_TYPES
from tokenledger.messages import (  # noqa: F401 - the field types, one rule each
    MAX_BATCH,
    MAX_BIGINT,
    Amount,
    Code,
    Id,
    Key,
    Metadata,
    PlanCode,
    Reason,
    StartRequest,
    Text,
    Timezone,
    TokenCount,
    UserId,
    WalletType,
    When,
)

T = TypeVar("T")
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
    balance: int = Field(description="Total over live wallets")
    available: int = Field(description="What a charge may draw now without overdraft")
    can_create_project: bool
    required_tokens: int = Field(description="The `project_creation` feature's cost")
    wallets: list[WalletOut]


class WalletAtOut(WalletOut):
    held_tokens: int = Field(description="Taken by holds open at that moment (not in "
                                         "balanceTokens; back if the hold is released)")


class BalanceAtOut(_Camel):
    user_id: str
    plan: str
    at: datetime
    balance: int = Field(description="Total over the wallets live at that moment")
    held_tokens: int = Field(description="Taken by holds open at that moment, apart")
    wallets: list[WalletAtOut]


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
    reason: Reason | None = None


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


StartIn = StartRequest


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
    hold_id: Id | None = None
    key: Key | None = None
    metadata: Metadata = None
    usage_reported: bool = Field(True, description="false: the provider reported no usage; "
                                 "the feature's on_incomplete rule settles the hold")


class EndOut(BaseModel):
    user_id: str
    key: str
    token: int | None = Field(None, description="Updated token balance")
    cost: int | None = Field(None, description="Final cost (after profit)")
    status: str = Field(description="returnable | not-returnable, or the event's outcome")
    message: str | None = None
    hold_id: int | None = None
    outcome: str | None = Field(None, description="incomplete: settled by the feature's "
                                "on_incomplete rule (no usage was reported)")


# -- events -------------------------------------------------------------------------------


class AcceptedOut(BaseModel):
    keys: list[str]
    count: int


class EventOutcomeOut(BaseModel):
    key: str
    status: str = Field(description="applied | declined | rejected | dead_lettered | pending")
    reason: str | None = None
    result: dict[str, Any] = {}


class StoredOutcomeOut(_Camel):
    """What the key's first payload did."""

    user_id: str | None
    event_type: str | None
    outcome: str
    reason: str | None
    result: dict[str, Any] | None
    created_at: datetime


class ConflictOut(_Camel):
    id: int
    key: str
    payload_hash: str
    payload: dict[str, Any] = Field(description="The conflicting payload (never applied)")
    seen_at: datetime
    stored: StoredOutcomeOut | None = Field(description="The outcome stored for the key")


class ConflictsOut(_Camel):
    conflicts: list[ConflictOut]
    total: int
    next_before: int | None = Field(
        description="Pass as `before` for the next (older) page; null on the last")


# -- accounts and reports -----------------------------------------------------------------


class OpenAccountIn(_Strict):
    user_id: UserId
    plan: PlanCode | None = None
    timezone: Timezone | None = None


class ThresholdIn(_Strict):
    threshold: Annotated[StrictInt, Field(ge=0, le=MAX_BIGINT)] | None = Field(
        description="Alert at or below this balance; null: the plan's threshold")


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
    tier: PlanCode | None = None
    limit: Annotated[StrictInt, Field(gt=0, le=10_000_000)] | None = None
    dry_run: StrictBool = False
    continue_on_error: StrictBool = True


class RenewalRunIn(RunIn):
    kind: Literal["monthly", "daily"] = "monthly"


# -- dashboard links ----------------------------------------------------------------------


class DashboardLinkIn(_Strict):
    user_id: UserId
    ttl_seconds: Annotated[StrictInt, Field(ge=1, le=7 * 86400)] = 900


class DashboardLinkOut(_Camel):
    user_id: str
    url: str
    token: str
    expires_at: datetime
    badge_html: str


def batch_limit() -> int:
    return MAX_BATCH


# -- streaming holds and the seeds' renewal and reset methods ---------------------------------


class ExtendOut(_Camel):
    status: str = Field(description="extended | limit_reached | closed")
    hold_id: int
    held: int = Field(description="The hold's total (new total when extended)")
    available: int = Field(description="What the account can still draw")
    added: int = 0
    covers_output_tokens: int | None = Field(
        None, description="Output tokens the hold pays for (usage-priced features)")
    expires_at: datetime | None = None
    reason: str | None = None


class EligibilityOut(_Camel):
    user_id: str
    plan: str
    period: str
    renewal_mode: str
    eligible: bool
    reason: str
    next_renewal_date: datetime
    days_until_renewal: int
    last_renewal: str | None = None
    allocation: int
    standard_balance: int | None = None


class RenewalOut(_Camel):
    success: bool
    user_id: str
    tokens_added: int
    new_balance: int | None = None
    error: str | None = None
    next_renewal_date: datetime | None = None
    run_id: int | None = None


class ResetOut(_Camel):
    key: str
    user_id: str
    previous_balance: int
    new_balance: int
    change: int
    reason: str
