"""What callers read back: an event's outcome, a start's answer, a balance.

Plain data, shared by the domain that produces them and the SDK, the CLI and the API that
hand them out; importing this module costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any

ACCESSIBLE = "accessible"
NOT_ACCESSIBLE = "not-accessible"


@dataclass(frozen=True, slots=True)
class EventResult:
    """What happened to one event.

    ``status`` is ``applied``, ``declined`` or ``rejected`` (the stored outcome),
    ``conflict`` (the key was first used with another payload: this event was never
    applied, and ``stored`` is what the key did), ``dead_lettered``, ``pending`` (no
    outcome yet) or, inside a worker's batch, ``duplicate`` / ``deferred``.

    ``replay`` tells, when the reader published the event itself, whether its publish is
    the one that applied the key (False) or one that found the key already applied and
    reads its stored outcome (True); None when that cannot be told.
    """

    key: str
    status: str
    reason: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    replay: bool | None = None
    stored: EventResult | None = None

    @property
    def final(self) -> bool:
        return self.status not in ("pending", "deferred")

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        out: dict[str, Any] = {"key": self.key, "status": self.status, "reason": self.reason,
                               "data": self.data, "replay": self.replay}
        if self.stored is not None:
            out["stored"] = self.stored.as_dict()
        return out


@dataclass(frozen=True, slots=True)
class StartResult:
    """The answer of a token-process start, in the seed's terms.

    ``token`` is the available balance (after the hold, when one was placed); ``held`` the
    credits set aside; ``required`` what the start needed when it was refused for tokens;
    ``replay`` True when a start with the same key answered first (this is its answer).
    """

    status: str
    token: int
    message: str | None = None
    hold_id: int | None = None
    user_id: str | None = None
    feature_endpoint_id: str | None = None
    held: int = 0
    required: int | None = None
    expires_at: datetime | None = None
    # Not part of the answer's value: a replay equals the answer it repeats.
    replay: bool | None = field(default=None, compare=False)

    @property
    def accessible(self) -> bool:
        return self.status == ACCESSIBLE

    @classmethod
    def from_stored(cls, data: dict[str, Any], available: int) -> StartResult:
        """A stored start's answer, with the balance available now, marked a replay."""
        expires = data.get("expires_at")
        return cls(data["status"], available, data.get("message"), data.get("hold_id"),
                   data.get("user_id"), data.get("feature_endpoint_id"),
                   data.get("held", 0), data.get("required"),
                   datetime.fromisoformat(expires) if expires else None, replay=True)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, without empty fields."""
        # Every field is a scalar: no need for asdict's deep copy on the hot path.
        data = {name: getattr(self, name) for name in _START_FIELDS}
        if self.expires_at is not None:
            data["expires_at"] = self.expires_at.isoformat()
        return {k: v for k, v in data.items() if v is not None}


_START_FIELDS = tuple(f.name for f in fields(StartResult))


EXTENDED = "extended"
LIMIT_REACHED = "limit_reached"
HOLD_CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class ExtendResult:
    """The answer of a hold's extend.

    ``status`` is ``extended`` (``held`` is the hold's new total, ``added`` what this
    extend drew), ``limit_reached`` (nothing drawn; ``available`` is what the account could
    still give) or ``closed`` (the hold is settled, released or expired). ``available`` is
    the account's balance free to draw after the answer; ``covers_output_tokens`` how many
    output tokens (after the input tokens given) the hold pays for, for usage-priced
    features.
    """

    status: str
    hold_id: int
    held: int
    available: int
    added: int = 0
    covers_output_tokens: int | None = None
    expires_at: datetime | None = None
    reason: str | None = None

    @property
    def extended(self) -> bool:
        return self.status == EXTENDED

    @classmethod
    def from_dict(cls, data: dict[str, Any], available: int | None = None) -> ExtendResult:
        """From ``as_dict`` (a stored or transmitted answer); ``available`` replaces the
        stored one when given (the balance now)."""
        expires = data.get("expires_at")
        return cls(data["status"], data["hold_id"], data.get("held", 0),
                   data.get("available", 0) if available is None else available,
                   data.get("added", 0), data.get("covers_output_tokens"),
                   datetime.fromisoformat(expires) if expires else None, data.get("reason"))

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, without empty fields."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.expires_at is not None:
            data["expires_at"] = self.expires_at.isoformat()
        return {k: v for k, v in data.items() if v is not None}


@dataclass(frozen=True)
class WalletInfo:
    """A wallet's balance (now, or as of a moment) and what open holds had taken from it
    (``held``: already out of ``balance``, given back if the hold is released)."""

    id: int
    wallet_type: str
    balance: int
    expires_at: datetime | None
    is_active: bool
    held: int = 0


@dataclass(frozen=True)
class Balance:
    """The total over live wallets and each wallet; ``at`` set when it is a past moment's
    (then ``held`` is what holds open at that moment had taken)."""

    user_id: str
    plan: str
    timezone: str
    balance: int
    wallets: list[WalletInfo]
    at: datetime | None = None
    held: int = 0


def balance_of(user_id: str, rows: list[Any]) -> Balance:
    """A Balance from the rows of ``ledger/sql/balance.sql`` (AccountNotFound: none)."""
    from tokenledger.errors import AccountNotFound
    from tokenledger.timeutil import as_utc

    if not rows:
        raise AccountNotFound(user_id)
    wallets = [WalletInfo(r[2], r[3], r[4], as_utc(r[5]), bool(r[6])) for r in rows
               if r[2] is not None]
    return Balance(user_id, rows[0][0], rows[0][1],
                   sum(w.balance for w in wallets if w.is_active), wallets)


def balance_at_of(user_id: str, at: datetime, rows: list[Any]) -> Balance:
    """A Balance as of ``at`` from the rows of ``ledger/sql/balance_at.sql``
    (AccountNotFound: none; ValidationFailed: ``at`` is before the retention cut-off)."""
    from tokenledger.errors import AccountNotFound, ValidationFailed
    from tokenledger.timeutil import as_utc

    if not rows:
        raise AccountNotFound(user_id)
    cutoff = as_utc(rows[0][8])
    if cutoff is not None and at < cutoff:
        raise ValidationFailed(f"at: {at.isoformat()} is before the retention cut-off "
                               f"{cutoff.isoformat()}: the entries before it were compacted "
                               "(their archive is ledger_entries_archive)")
    wallets = [WalletInfo(r[2], r[3], r[4], as_utc(r[5]), bool(r[6]), int(r[7]))
               for r in rows if r[2] is not None]
    return Balance(user_id, rows[0][0], rows[0][1],
                   sum(w.balance for w in wallets if w.is_active), wallets, at,
                   sum(w.held for w in wallets))


@dataclass(frozen=True, slots=True)
class RenewalResult:
    """What a manual renewal of one account did (the seed's ``renewUser``): granted
    (``tokens_added``, ``new_balance``), or not due (``error`` says why,
    ``next_renewal_date`` when it will be)."""

    success: bool
    user_id: str
    tokens_added: int
    new_balance: int | None
    error: str | None = None
    next_renewal_date: datetime | None = None
    run_id: int | None = None


@dataclass(frozen=True, slots=True)
class ResetResult:
    """A balance reset's answer (the seed's ``resetBalance``): the balance before and
    after and the audited ``ADJUSTMENT`` it made."""

    key: str
    user_id: str
    previous_balance: int
    new_balance: int
    change: int
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True, slots=True)
class Affordability:
    """Whether an account may use a feature now (the seed's ``canAfford``): its ``cost``
    (a usage feature's minimum), the ``balance``, what is ``available`` to draw and the
    ``deficit``; ``reason`` when it cannot."""

    user_id: str
    feature: str
    cost: int
    balance: int
    available: int
    can_afford: bool
    deficit: int
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class Entry:
    """One ledger entry, as ``history`` lists them (the seed's ``getUserEntries``)."""

    id: int
    user_id: str
    wallet_id: int
    wallet_type: str
    amount: int
    balance_before: int
    balance_after: int
    type: str
    feature: str | None
    event_key: str | None
    reference: str | None
    metadata: dict[str, Any] | None
    description: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Statistics:
    """Totals over a period (the seed's ``getUserStatistics``); ``extra`` holds the
    breakdowns (``by_type``, ``by_feature``, ``by_model``, ``margin``)."""

    user_id: str
    start: datetime | None
    end: datetime | None
    total_spent: int
    total_refunded: int
    net_spent: int
    total_earned: int
    total_removed: int
    net_change: int
    operation_count: int
    average_per_operation: float
    extra: dict[str, Any] = field(default_factory=dict)


def of(kind: type[Any], data: dict[str, Any]) -> Any:
    """A result dataclass from its JSON dict (the domain's report, or an HTTP answer):
    timestamps parsed, fields it does not name kept in ``extra`` when it has one."""
    names = {f.name for f in fields(kind)}
    values: dict[str, Any] = {}
    for name in names - {"extra"}:
        value = data.get(name)
        if isinstance(value, str) and name in _TIMES:
            value = datetime.fromisoformat(value)
        values[name] = value
    if "extra" in names:
        values["extra"] = {k: v for k, v in data.items() if k not in names}
    return kind(**values)


_TIMES = frozenset({"created_at", "start", "end", "next_renewal_date", "expires_at"})
