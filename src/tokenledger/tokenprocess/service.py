"""The two-phase token process: start places a hold, end settles it, expiry releases it.

A hold *debits* the wallets when it is placed (``HOLD`` entries, drawn in the usual
order), so the available balance is simply the wallet balances and two concurrent starts
cannot both spend the same credits: each locks the account row first. Resolving a hold
gives each wallet its held part back (``HOLD_RELEASE``; a wallet that has expired since
gives it to STANDARD, as refunds do) and the end then charges the real cost.

Every function here takes the caller's Session and never commits.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from tokenledger import notify
from tokenledger.catalog import Catalog, current_catalog
from tokenledger.config import Settings
from tokenledger.db import is_transient, unit_of_work
from tokenledger.errors import AccountNotFound, IdempotencyConflict
from tokenledger.ledger.service import (
    ApplyContext,
    BalanceChange,
    EventResult,
    _Batch,
    _Reject,
    draw,
    holds_t,
    outcomes_t,
)
from tokenledger.ledger.wallets import AccountState, WalletState, draw_order
from tokenledger.messages import TokenProcessEnd
from tokenledger.models import STANDARD
from tokenledger.pricing import estimate_hold, price_usage, resolve_model
from tokenledger.timeutil import as_utc, utcnow
from tokenledger.tokenprocess import pgstart
from tokenledger.tokenprocess.models import OPEN, HoldState

ACCESSIBLE = "accessible"
NOT_ACCESSIBLE = "not-accessible"
RETURNABLE = "returnable"
NOT_RETURNABLE = "not-returnable"
# The seed's messages, word for word: clients match on them.
INSUFFICIENT = "Insufficient tokens"
NOT_IN_PACKAGE = "Feature endpoint is not available in your package"
START_EVENT = "token_process_start"


@dataclass(frozen=True, slots=True)
class StartResult:
    """The answer of a token-process start, in the seed's terms.

    ``token`` is the available balance (after the hold, when one was placed); ``held`` the
    credits set aside; ``required`` what the start needed when it was refused for tokens.
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

    @property
    def accessible(self) -> bool:
        return self.status == ACCESSIBLE

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, without empty fields."""
        # Every field is a scalar: no need for asdict's deep copy on the hot path.
        data = {name: getattr(self, name) for name in _START_FIELDS}
        if self.expires_at is not None:
            data["expires_at"] = self.expires_at.isoformat()
        return {k: v for k, v in data.items() if v is not None}


_START_FIELDS = tuple(f.name for f in fields(StartResult))


# -- start --------------------------------------------------------------------------------


def _start_digest(user_id: str, feature: str, max_output_tokens: int | None,
                  hold: int | None, model: str | None) -> str:
    blob = json.dumps({"type": START_EVENT, "user_id": user_id, "feature": feature,
                       "max_output_tokens": max_output_tokens, "hold": hold, "model": model},
                      sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class HoldPlan:
    """The hold a start is about to place (decided under the account lock)."""

    amount: int
    key: str
    expires_at: datetime
    model: str | None
    metadata: dict[str, Any]  # shared by the hold's entries; the hold id is added later


def plan_hold(catalog: Catalog, plan_code: str, available: int, *, now: datetime,
              user_id: str, feature_endpoint_id: str, max_output_tokens: int | None,
              hold: int | None, model: str | None, key: str | None,
              hold_ttl_seconds: int) -> StartResult | HoldPlan:
    """A start's decision: a refusal in the seed's words, or the hold to place.

    Shared by the portable and the PostgreSQL start, which differ only in how they write.
    """
    feature = catalog.features.get(feature_endpoint_id)
    if feature is None or not catalog.plan_includes(plan_code, feature_endpoint_id):
        return StartResult(NOT_ACCESSIBLE, available, NOT_IN_PACKAGE, user_id=user_id,
                           feature_endpoint_id=feature_endpoint_id)
    amount = estimate_hold(catalog, feature, max_output_tokens=max_output_tokens, hold=hold,
                           model=model)
    if amount > available:
        return StartResult(NOT_ACCESSIBLE, available, INSUFFICIENT, user_id=user_id,
                           feature_endpoint_id=feature_endpoint_id, required=amount)
    expires_at = now + timedelta(seconds=hold_ttl_seconds)
    chosen = resolve_model(catalog, feature, model) if feature.pricing == "usage" else model
    meta: dict[str, Any] = {"expires_at": expires_at.isoformat()}
    if chosen:
        meta["model"] = chosen
    if max_output_tokens is not None:
        meta["max_output_tokens"] = max_output_tokens
    return HoldPlan(amount, key or f"hold:{uuid.uuid4().hex}", expires_at, chosen, meta)


def start(session: Session, user_id: str, feature_endpoint_id: str, *, now: datetime,
          hold_ttl_seconds: int, max_output_tokens: int | None = None,
          hold: int | None = None, model: str | None = None, key: str | None = None,
          catalog: Catalog | None = None, default_timezone: str = "UTC"
          ) -> tuple[StartResult, list[BalanceChange]]:
    """Check access and balance and place the hold, atomically under the account lock.

    Concurrent starts on one account serialize on its row, so their holds never add up to
    more than the balance. With a ``key`` the start is idempotent: the same key and
    arguments return the first answer, other arguments raise IdempotencyConflict.
    Raises AccountNotFound for an unknown user. Also returns the balance change to
    announce after commit (none when nothing was held).
    """
    if max_output_tokens is not None and max_output_tokens < 0:
        raise ValueError("max_output_tokens must be >= 0")
    if hold is not None and hold < 0:
        raise ValueError("hold must be >= 0")
    catalog = catalog or current_catalog(session)
    digest = _start_digest(user_id, feature_endpoint_id, max_output_tokens, hold, model)
    if session.get_bind().dialect.name == "postgresql":
        result, changes, _ = pgstart.start(
            session, user_id, feature_endpoint_id, now=now, hold_ttl_seconds=hold_ttl_seconds,
            max_output_tokens=max_output_tokens, hold=hold, model=model, key=key,
            catalog=catalog, digest=digest)
        return result, changes
    batch = _Batch(session, ApplyContext(catalog, now, default_timezone))
    batch.lock_accounts(user_ids=[user_id])
    account = batch.accounts.get(user_id)
    if account is None:
        raise AccountNotFound(user_id)
    if key is not None:
        stored = session.execute(select(outcomes_t.c.payload_hash, outcomes_t.c.result)
                                 .where(outcomes_t.c.key == key)).first()
        if stored is not None:
            if stored.payload_hash != digest or not stored.result:
                raise IdempotencyConflict(key)
            return _stored_start(stored.result, account.available(now)), []

    decided = plan_hold(catalog, account.plan_code, account.available(now), now=now,
                        user_id=user_id, feature_endpoint_id=feature_endpoint_id,
                        max_output_tokens=max_output_tokens, hold=hold, model=model, key=key,
                        hold_ttl_seconds=hold_ttl_seconds)
    if isinstance(decided, StartResult):
        return decided, []
    amount, hold_key, expires_at = decided.amount, decided.key, decided.expires_at
    chosen, meta = decided.model, decided.metadata
    allocations = draw(batch, account, amount, key=hold_key, type_="HOLD",
                       feature=feature_endpoint_id, allow_overdraft=False, preferred=None,
                       metadata=meta) if amount else []
    hold_id = session.execute(
        holds_t.insert().values(
            key=hold_key, account_id=account.id, user_id=user_id, feature=feature_endpoint_id,
            model=chosen, amount=amount, allocations=allocations, status=OPEN,
            expires_at=expires_at, created_at=now)
        .returning(holds_t.c.id)
    ).scalar_one()
    meta["hold_id"] = hold_id
    token = account.available(now)
    result = StartResult(ACCESSIBLE, token, None, hold_id, user_id, feature_endpoint_id,
                         amount, None, expires_at)
    # The outcome row makes the hold key a first-class event key: verify sees its entries
    # as applied, and a retried start with the same key finds its answer here.
    batch.outcomes.append({
        "key": hold_key, "payload_hash": digest, "user_id": user_id,
        "event_type": START_EVENT, "outcome": "applied", "reason": None,
        "result": result.as_dict(), "created_at": now,
    })
    return result, batch.flush()


def run_start(settings: Settings, user_id: str, feature_endpoint_id: str, *,
              max_output_tokens: int | None = None, hold: int | None = None,
              model: str | None = None, key: str | None = None,
              publish_in_background: bool = True) -> StartResult:
    """One start in its own unit of work; its notices are published once it committed
    (from a background thread, or before returning with ``publish_in_background=False``).

    A deadlock, a serialization failure or a lost connection is tried again (up to 3
    attempts). Every attempt carries the same hold key (the caller's, or one made up
    here), so when a connection was lost during the commit and the commit had happened,
    the next attempt finds that outcome and answers it instead of holding again.
    """
    key = key or f"hold:{uuid.uuid4().hex}"
    attempt = 0
    while True:
        try:
            now = utcnow()
            with unit_of_work(settings.database_url) as session:
                catalog = current_catalog(session)
                if session.get_bind().dialect.name == "postgresql":
                    result, _, notices = pgstart.start(
                        session, user_id, feature_endpoint_id, now=now,
                        hold_ttl_seconds=settings.hold_ttl_seconds,
                        max_output_tokens=_checked("max_output_tokens", max_output_tokens),
                        hold=_checked("hold", hold), model=model, key=key, catalog=catalog,
                        digest=_start_digest(user_id, feature_endpoint_id, max_output_tokens,
                                             hold, model),
                        with_notices=True)
                else:
                    result, changes = start(
                        session, user_id, feature_endpoint_id, now=now,
                        hold_ttl_seconds=settings.hold_ttl_seconds,
                        max_output_tokens=max_output_tokens, hold=hold, model=model, key=key,
                        catalog=catalog, default_timezone=settings.timezone)
                    notices = []
                    if changes:
                        notify.stage(session, settings, changes, catalog, now)
            if publish_in_background:
                notify.publish_soon(settings, notices)
            else:
                notify.publish(settings, notices)
            return result
        except Exception as exc:
            attempt += 1
            if attempt >= 3 or not is_transient(exc):
                raise
            time.sleep(0.01 * attempt)


def _checked(name: str, value: int | None) -> int | None:
    if value is not None and value < 0:
        raise ValueError(f"{name} must be >= 0")
    return value


def _stored_start(data: dict[str, Any], available: int) -> StartResult:
    expires = data.get("expires_at")
    return StartResult(data["status"], available, data.get("message"), data.get("hold_id"),
                       data.get("user_id"), data.get("feature_endpoint_id"),
                       data.get("held", 0), data.get("required"),
                       datetime.fromisoformat(expires) if expires else None)


# -- releasing a hold ---------------------------------------------------------------------


def release(batch: _Batch, account: AccountState, hold: HoldState, status: str,
            resolved_by: str | None) -> list[dict[str, Any]]:
    """Give each wallet its held part back and mark the hold resolved (in this batch).

    A wallet that is no longer live gets nothing back: its part goes to STANDARD, as
    refunds do. The entries carry the hold's key, so the ledger's unique (event key,
    wallet, type) refuses a second release of the same hold.
    """
    assert hold.status == OPEN, hold
    now = batch.ctx.now
    by_id = {w.id: w for w in account.wallets}
    targets: dict[int, int] = defaultdict(int)
    standard: WalletState | None = None
    for part in hold.allocations:
        wallet = by_id.get(part["wallet_id"])
        if wallet is None or not wallet.live(now):
            standard = standard or account.standard() or batch.new_wallet(account, STANDARD,
                                                                          None)
            by_id[standard.id] = standard
            wallet = standard
        targets[wallet.id] += part["amount"]
    meta = {"hold_id": hold.id, "resolution": status}
    returned = []
    for wallet_id, amount in targets.items():
        if amount:
            wallet = by_id[wallet_id]
            batch.entry(account, wallet, amount, "HOLD_RELEASE", hold.key, hold.feature,
                        reference=resolved_by, metadata=meta)
            returned.append({"wallet_id": wallet_id, "wallet_type": wallet.wallet_type,
                             "amount": amount})
    hold.status = status
    hold.resolved_by = resolved_by
    batch.hold_updates.append({"_id": hold.id, "_status": status, "_at": now,
                               "_by": resolved_by})
    return returned


def _hold_first(batch: _Batch, account: AccountState, hold: HoldState | None
                ) -> list[WalletState] | None:
    """Draw order for settling: the hold's own wallets first, then the usual order."""
    if hold is None:
        return None
    now = batch.ctx.now
    usual = draw_order(account, batch.ctx.catalog, now, None)
    held = {p["wallet_id"] for p in hold.allocations}
    return [w for w in usual if w.id in held] + [w for w in usual if w.id not in held]


# -- end ----------------------------------------------------------------------------------


def end(batch: _Batch, account: AccountState, event: TokenProcessEnd) -> EventResult:
    """Apply a token_process_end: price the usage, settle the hold, store the outcome.

    With an open hold: release it, then charge the real cost, the hold's wallets first.
    A cost above what is available follows the feature's overdraft policy: with overdraft
    STANDARD goes negative; without, what is available is charged and the rest recorded as
    ``unpaid``. Either way the status is ``not-returnable`` and the shortfall is stored.
    Both counts 0 release the hold and charge nothing. An end naming another account's
    hold, an unknown one or one already settled is rejected; a hold that expired first is
    ignored (its credits went back) and the usage is charged as if there were none.
    """
    ctx = batch.ctx
    now = ctx.now
    catalog = ctx.catalog
    code = event.feature_endpoint_id
    hold: HoldState | None = None
    hold_note: str | None = None
    if event.hold_id is not None:
        hold = batch.holds.get(event.hold_id)
        if hold is None or hold.account_id != account.id:
            raise _Reject(f"hold {event.hold_id} not found for this account")
        if hold.feature != code:
            raise _Reject(f"hold {hold.id} was placed for feature {hold.feature!r}, "
                          f"not {code!r}")
        if hold.status in ("settled", "released"):
            by = f" by {hold.resolved_by!r}" if hold.resolved_by else ""
            raise _Reject(f"hold {hold.id} was already {hold.status}{by}")
        if hold.status == "expired":
            hold_note, hold = "expired", None
    feature = catalog.features.get(code)
    if feature is None:
        raise _Reject(f"unknown feature {code!r}")
    # A live hold proves the start's access check; without one, check it now.
    if hold is None and not catalog.plan_includes(account.plan_code, code):
        raise _Reject(NOT_IN_PACKAGE)

    price = price_usage(catalog, feature, event.input_tokens, event.output_tokens,
                        event.model or (hold.model if hold else None))
    released: list[dict[str, Any]] = []
    if hold is not None:
        released = release(batch, account, hold, "settled" if price.cost else "released",
                           event.key)
    cost = price.cost
    available = account.available(now)
    shortfall = max(0, cost - available)
    take = cost if feature.allow_overdraft else min(cost, available)
    touched: list[dict[str, Any]] = []
    if take:
        meta = {**(event.metadata or {}), **price.metadata(),
                "input_tokens": event.input_tokens, "output_tokens": event.output_tokens}
        if event.hold_id is not None:
            meta["hold_id"] = event.hold_id
        if shortfall:
            meta["shortfall"] = shortfall
        touched = draw(batch, account, take, key=event.key, type_="CHARGE", feature=code,
                       allow_overdraft=feature.allow_overdraft, preferred=None,
                       metadata=meta, order=_hold_first(batch, account, hold))
        # A refund of this end (by its key) in the same batch finds what it charged.
        batch.charged[event.key] = defaultdict(int, {t["wallet_id"]: t["amount"]
                                                     for t in touched})
        batch.charge_owner[event.key] = account.id
    data: dict[str, Any] = {
        "user_id": account.user_id,
        "token": account.balance(now),
        "cost": cost,
        "status": NOT_RETURNABLE if shortfall else RETURNABLE,
        "charged": take,
        "input_tokens": event.input_tokens,
        "output_tokens": event.output_tokens,
        "exact_cost": price.metadata()["exact_cost"],
        "wallets": touched,
    }
    if price.model is not None:
        data["model"] = price.model
    if event.hold_id is not None:
        data["hold_id"] = event.hold_id
        data["hold"] = hold_note or (hold.status if hold else None)
        data["released"] = sum(r["amount"] for r in released)
    if shortfall:
        data["shortfall"] = shortfall
        data["unpaid"] = cost - take
        data["overdraft"] = feature.allow_overdraft
        data["message"] = (f"{INSUFFICIENT}: the cost {cost} exceeded the available "
                           f"{available} by {shortfall}"
                           + ("; the STANDARD wallet went negative" if feature.allow_overdraft
                              else f"; {shortfall} could not be charged"))
    return EventResult(event.key, "applied", None, data)


# -- expiry -------------------------------------------------------------------------------


@dataclass(slots=True)
class ExpiryReport:
    """What one expiry pass did."""

    holds: int = 0
    accounts: int = 0
    credits: int = 0
    balance_changes: list[BalanceChange] | None = None


def release_expired_holds(session: Session, now: datetime, *, limit: int = 1000,
                          catalog: Catalog | None = None) -> ExpiryReport:
    """Release open holds past ``expires_at`` for up to ``limit`` accounts, each once.

    Safe to run twice or concurrently: accounts are locked in id order before their holds
    are re-read, so a hold that another pass (or an end) resolved meanwhile is skipped.
    Returns fewer than ``limit`` accounts when nothing more is due.
    """
    account_ids = list(session.scalars(
        select(holds_t.c.account_id).where(holds_t.c.status == OPEN,
                                           holds_t.c.expires_at <= now)
        .group_by(holds_t.c.account_id).order_by(holds_t.c.account_id).limit(limit)))
    report = ExpiryReport(accounts=len(account_ids))
    if not account_ids:
        return report
    batch = _Batch(session, ApplyContext(catalog or current_catalog(session), now))
    batch.lock_accounts(account_ids=account_ids)
    by_id = {a.id: a for a in batch.accounts.values()}
    for row in session.execute(
        select(holds_t).where(holds_t.c.account_id.in_(account_ids),
                              holds_t.c.status == OPEN, holds_t.c.expires_at <= now)
        .order_by(holds_t.c.account_id, holds_t.c.id)
    ):
        hold = HoldState.from_row(row)
        returned = release(batch, by_id[hold.account_id], hold, "expired", None)
        report.holds += 1
        report.credits += sum(r["amount"] for r in returned)
    report.balance_changes = batch.flush()
    return report


def open_holds(session: Session, user_id: str | None = None, *, status: str | None = OPEN,
               limit: int = 100) -> list[dict[str, Any]]:
    """Holds, newest first, optionally of one user and one status (read-only)."""
    query = select(holds_t)
    if user_id is not None:
        query = query.where(holds_t.c.user_id == user_id)
    if status is not None:
        query = query.where(holds_t.c.status == status)
    rows = session.execute(query.order_by(holds_t.c.id.desc()).limit(limit))
    return [{
        "id": r.id, "user_id": r.user_id, "feature": r.feature, "model": r.model,
        "amount": r.amount, "status": r.status, "allocations": r.allocations,
        "created_at": as_utc(r.created_at).isoformat(),
        "expires_at": as_utc(r.expires_at).isoformat(),
        "resolved_at": as_utc(r.resolved_at).isoformat() if r.resolved_at else None,
        "resolved_by": r.resolved_by,
    } for r in rows]
