"""Versioned event schemas: the wire contract between producers and workers."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    TypeAdapter,
    ValidationError,
    model_validator,
)

MAX_BATCH = 1000
MAX_METADATA_BYTES = 16 * 1024
MAX_AMOUNT = 10**12
MAX_TOKENS = 10**10
MAX_BIGINT = 2**63 - 1


def clean_text(value: str) -> str:
    """Refuse what an identifier column cannot hold or should not: control characters
    (NUL among them) and lone surrogates."""
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


def _check_metadata(value: dict[str, Any] | None) -> dict[str, Any] | None:
    if value is None:
        return value
    check_json(value)
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


def _in_range(value: datetime) -> datetime:
    """An event's timestamp as given (naive means UTC), if PostgreSQL can store it; kept in
    its own offset so the event's payload hash does not change."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    if not 1970 <= value.year <= 9998:
        raise ValueError("year must be between 1970 and 9998")
    return value


def _check_timezone(value: str | None) -> str | None:
    if value is None:
        return value
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown IANA timezone {value!r}") from None
    return value


# The field types of every message and request, so each rule exists once.
Text = Annotated[str, AfterValidator(clean_text)]
Key = Annotated[str, Field(min_length=1, max_length=255), AfterValidator(clean_text)]
UserId = Annotated[str, Field(min_length=1, max_length=128), AfterValidator(clean_text)]
Code = Annotated[str, Field(min_length=1, max_length=128), AfterValidator(clean_text)]
PlanCode = Annotated[str, Field(min_length=1, max_length=64), AfterValidator(clean_text)]
Reason = Annotated[str, Field(max_length=255), AfterValidator(clean_text)]
Amount = Annotated[StrictInt, Field(gt=0, le=MAX_AMOUNT)]
HoldAmount = Annotated[StrictInt, Field(ge=0, le=MAX_AMOUNT)]
TokenCount = Annotated[StrictInt, Field(ge=0, le=MAX_TOKENS)]
Id = Annotated[StrictInt, Field(gt=0, le=MAX_BIGINT)]
WalletType = Annotated[str, Field(pattern=r"^[A-Z][A-Z0-9_]{0,31}$")]
Timezone = Annotated[str, Field(min_length=1, max_length=64), AfterValidator(clean_text),
                     AfterValidator(_check_timezone)]
Metadata = Annotated[dict[str, Any] | None, AfterValidator(_check_metadata)]
When = Annotated[datetime, AfterValidator(aware)]
EventTime = Annotated[datetime, AfterValidator(_in_range)]


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
    plan: PlanCode | None = None
    timezone: Timezone | None = None


class Charge(_Event):
    type: Literal["charge"]
    feature: Code | None = None
    amount: Amount | None = None
    metadata: Metadata = None
    allow_overdraft: StrictBool = False
    preferred_wallet_type: WalletType | None = None

    @model_validator(mode="after")
    def _feature_or_amount(self) -> Charge:
        if self.feature is None and self.amount is None:
            raise ValueError("a charge needs a feature or an amount")
        if self.feature is not None and self.amount is not None:
            # Which one would win is a guess the caller should not have to make.
            raise ValueError("give a feature (its catalog cost) or an amount, not both")
        return self


class Credit(_Event):
    type: Literal["credit"]
    amount: Amount
    wallet_type: WalletType = "PREMIUM"
    expires_at: EventTime | None = None
    reason: Reason | None = None
    metadata: Metadata = None


class Refund(_Event):
    type: Literal["refund"]
    original_key: Key
    amount: Amount | None = None
    reason: Annotated[str, Field(max_length=64), AfterValidator(clean_text)] | None = None
    metadata: Metadata = None


class TokenProcessEnd(_Event):
    type: Literal["token_process_end"]
    feature_endpoint_id: Code
    input_tokens: TokenCount
    output_tokens: TokenCount
    model: Code | None = None
    hold_id: Id | None = None
    metadata: Metadata = None
    # False: the provider reported nothing (the counts are 0); the feature's
    # ``on_incomplete`` rule settles the hold and the outcome says ``incomplete``.
    usage_reported: bool = True


AnyEvent = OpenAccount | Charge | Credit | Refund | TokenProcessEnd
Event = Annotated[AnyEvent, Field(discriminator="type")]
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
        # A rule of our own reads as its own words, without pydantic's "Value error, ".
        parts.append(f"{field}: {str(item['msg']).removeprefix('Value error, ')}")
    return "; ".join(parts)


def parse_event(raw: Any) -> AnyEvent:
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


class StartRequest(BaseModel):
    """A token-process start: the seed's fields, checked here for the SDK, the CLI and
    the HTTP API alike."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    user_id: UserId
    feature_endpoint_id: Code
    max_output_tokens: TokenCount | None = None
    hold: HoldAmount | None = None
    model: Code | None = None

    def digest(self) -> str:
        """Hash of the start's arguments: a hold key reused with others is a conflict."""
        blob = json.dumps({"type": "token_process_start", "user_id": self.user_id,
                           "feature": self.feature_endpoint_id,
                           "max_output_tokens": self.max_output_tokens, "hold": self.hold,
                           "model": self.model}, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


def validated(kind: type[Any], fields: dict[str, Any]) -> Any:
    """``kind`` validated from ``fields``, or ValidationFailed naming each bad field."""
    from tokenledger.errors import ValidationFailed

    try:
        return kind.model_validate(fields)
    except ValidationError as exc:
        raise ValidationFailed(describe(exc)) from None
