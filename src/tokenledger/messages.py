"""Versioned event schemas: the wire contract between producers and workers."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

MAX_BATCH = 1000
MAX_METADATA_BYTES = 16 * 1024
MAX_AMOUNT = 10**12

Key = Annotated[str, Field(min_length=1, max_length=255)]
UserId = Annotated[str, Field(min_length=1, max_length=128)]
Code = Annotated[str, Field(min_length=1, max_length=128)]
Amount = Annotated[StrictInt, Field(gt=0, le=MAX_AMOUNT)]
WalletType = Annotated[str, Field(pattern=r"^[A-Z][A-Z0-9_]{0,31}$")]
TokenCount = Annotated[StrictInt, Field(ge=0, le=10**10)]


def _check_metadata(value: dict[str, Any] | None) -> dict[str, Any] | None:
    if value is not None and len(json.dumps(value, separators=(",", ":"))) > MAX_METADATA_BYTES:
        raise ValueError(f"must be at most {MAX_METADATA_BYTES} bytes of JSON")
    return value


def _check_timezone(value: str | None) -> str | None:
    if value is None:
        return value
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown IANA timezone {value!r}") from None
    return value


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = 1
    key: Key
    user_id: UserId

    def payload_hash(self) -> str:
        """Hash of the event's meaning: the same for any encoding of the same event."""
        canonical = self.model_dump(mode="json", exclude_none=True, exclude_defaults=True)
        canonical["type"] = self.type  # type: ignore[attr-defined]
        blob = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def to_message(self) -> dict[str, Any]:
        """The JSON-ready dict a producer publishes."""
        return self.model_dump(mode="json", exclude_none=True)


class OpenAccount(_Event):
    type: Literal["open_account"]
    plan: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    timezone: Annotated[str, Field(max_length=64)] | None = None

    _tz = field_validator("timezone")(_check_timezone)


class Charge(_Event):
    type: Literal["charge"]
    feature: Code | None = None
    amount: Amount | None = None
    metadata: dict[str, Any] | None = None
    allow_overdraft: StrictBool = False
    preferred_wallet_type: WalletType | None = None

    _meta = field_validator("metadata")(_check_metadata)

    @model_validator(mode="after")
    def _feature_or_amount(self) -> Charge:
        if self.feature is None and self.amount is None:
            raise ValueError("a charge needs a feature or an amount")
        return self


class Credit(_Event):
    type: Literal["credit"]
    amount: Amount
    wallet_type: WalletType = "PREMIUM"
    expires_at: datetime | None = None
    reason: Annotated[str, Field(max_length=255)] | None = None
    metadata: dict[str, Any] | None = None

    _meta = field_validator("metadata")(_check_metadata)

    @field_validator("expires_at")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Refund(_Event):
    type: Literal["refund"]
    original_key: Key
    amount: Amount | None = None
    reason: Annotated[str, Field(max_length=64)] | None = None
    metadata: dict[str, Any] | None = None

    _meta = field_validator("metadata")(_check_metadata)


class TokenProcessEnd(_Event):
    type: Literal["token_process_end"]
    feature_endpoint_id: Code
    input_tokens: TokenCount
    output_tokens: TokenCount
    model: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    hold_id: Annotated[StrictInt, Field(gt=0)] | None = None
    metadata: dict[str, Any] | None = None

    _meta = field_validator("metadata")(_check_metadata)


Event = Annotated[
    OpenAccount | Charge | Credit | Refund | TokenProcessEnd, Field(discriminator="type")
]
EVENT_TYPES = ("open_account", "charge", "credit", "refund", "token_process_end")
_adapter: TypeAdapter[Any] = TypeAdapter(Event)


def describe(error: ValidationError) -> str:
    """One line naming each bad field: ``amount: Input should be greater than 0``."""
    parts = []
    for item in error.errors(include_url=False):
        loc = [str(p) for p in item["loc"] if p not in EVENT_TYPES]
        field = ".".join(loc) or "event"
        if item["type"] in ("union_tag_invalid", "union_tag_not_found"):
            field = "type"
        parts.append(f"{field}: {item['msg']}")
    return "; ".join(parts)


def parse_event(raw: Any) -> OpenAccount | Charge | Credit | Refund | TokenProcessEnd:
    """Validate one event; raises ``ValueError`` whose text names the bad fields."""
    if not isinstance(raw, dict):
        raise ValueError(f"event: expected a JSON object, got {type(raw).__name__}")
    try:
        return _adapter.validate_python(raw)
    except ValidationError as exc:
        raise ValueError(describe(exc)) from None


def as_batch(payload: Any) -> list[Any]:
    """A message holds one event (an object) or a batch (a list of at most MAX_BATCH)."""
    if isinstance(payload, dict):
        return [payload]
    if isinstance(payload, list):
        if not payload:
            raise ValueError("batch: must hold at least one event")
        if len(payload) > MAX_BATCH:
            raise ValueError(f"batch: at most {MAX_BATCH} events, got {len(payload)}")
        return payload
    raise ValueError(f"message: expected an event object or a list, got {type(payload).__name__}")


def fingerprint(raw: Any) -> str:
    """A stable hash of any payload, good or bad, for dead-letter de-duplication."""
    try:
        blob = json.dumps(raw, sort_keys=True, separators=(",", ":"), default=str)
    except (TypeError, ValueError):
        blob = repr(raw)
    return hashlib.sha256(blob.encode()).hexdigest()


def parse_batch(payload: Any) -> tuple[list[Any], list[tuple[Any, str]]]:
    """Split a message into valid events and (raw, reason) pairs for the dead-letter store."""
    try:
        raws = as_batch(payload)
    except ValueError as exc:
        return [], [(payload, str(exc))]
    events, invalid = [], []
    for raw in raws:
        try:
            events.append(parse_event(raw))
        except ValueError as exc:
            invalid.append((raw, str(exc)))
    return events, invalid
