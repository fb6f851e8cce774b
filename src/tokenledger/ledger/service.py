"""Applying events to the ledger: a batch in one transaction, each key at most once.

The caller owns the transaction (a unit of work); nothing here commits.

Order of work for a batch, and why:
1. Lock the batch's accounts ``FOR UPDATE`` in id order. Every writer (workers, the
   synchronous start, renewals) locks accounts before touching their wallets, so the
   account row is the single serialization point and a fixed order rules out deadlocks.
2. Only then read the stored outcomes and wallets. Under READ COMMITTED each statement
   sees what committed before it, so a batch that waited for a lock sees the winner's
   outcome rows and treats a redelivered key as a duplicate instead of applying it again.
3. Apply the events in order, in memory, then write wallets, entries and outcomes with a
   handful of set-based statements.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import and_, bindparam, or_, select, update
from sqlalchemy.orm import Session

from tokenledger.bulk import any_of, copy_rows, set_balances
from tokenledger.catalog import Catalog
from tokenledger.db import insert_for
from tokenledger.errors import InsufficientTokens, RetryableConflict
from tokenledger.ledger.wallets import AccountState, WalletState, draw_order
from tokenledger.messages import Charge, Credit, OpenAccount, Refund, TokenProcessEnd, fingerprint
from tokenledger.models import (
    STANDARD,
    Account,
    DeadLetter,
    EventConflict,
    EventOutcome,
    LedgerEntry,
    Wallet,
)
from tokenledger.timeutil import as_utc, local_date, utcnow
from tokenledger.tokenprocess.models import Hold, HoldState

log = logging.getLogger(__name__)

AnyEvent = OpenAccount | Charge | Credit | Refund | TokenProcessEnd

accounts_t = Account.__table__
wallets_t = Wallet.__table__
entries_t = LedgerEntry.__table__
outcomes_t = EventOutcome.__table__
holds_t = Hold.__table__


@dataclass(frozen=True, slots=True)
class EventResult:
    """What happened to one event: applied / declined / rejected (stored), or
    duplicate / conflict / dead_lettered / deferred / pending (not stored as an outcome)."""

    key: str
    status: str
    reason: str | None = None
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def final(self) -> bool:
        return self.status not in ("pending", "deferred")


@dataclass(slots=True)
class ApplyContext:
    catalog: Catalog
    now: datetime
    default_timezone: str = "UTC"


@dataclass(slots=True)
class BalanceChange:
    user_id: str
    balance: int
    ledger_seq: int


@dataclass(slots=True)
class BatchResult:
    results: list[EventResult]
    deferred: list[AnyEvent] = field(default_factory=list)
    dead_lettered: int = 0
    balance_changes: list[BalanceChange] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(1 for r in self.results if r.status == status)


class _Reject(Exception):
    """An event that is final and stored as ``rejected`` (bad reference, unknown feature)."""


class _Defer(Exception):
    """An event that must wait for another (a refund whose charge is not applied yet)."""


@dataclass(slots=True)
class _Stored:
    payload_hash: str
    outcome: str
    reason: str | None
    result: dict[str, Any] | None


class _Batch:
    """The in-memory state of one batch while its events are applied in order."""

    def __init__(self, session: Session, ctx: ApplyContext) -> None:
        self.session = session
        self.ctx = ctx
        self.accounts: dict[str, AccountState] = {}
        self.stored: dict[str, _Stored] = {}
        self.entries: list[dict[str, Any]] = []
        self.outcomes: list[dict[str, Any]] = []
        # CHARGE and REFUND amounts per original key and wallet, for refunds.
        self.charged: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        self.refunded: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        self.charge_owner: dict[str, int] = {}
        # Holds named by token_process_end events, and their status changes to write.
        self.holds: dict[int, HoldState] = {}
        self.hold_updates: list[dict[str, Any]] = []

    # -- loading -----------------------------------------------------------------------

    def lock_accounts(self, user_ids: list[str] | None = None,
                      account_ids: list[int] | None = None) -> None:
        """Lock the named accounts ``FOR UPDATE`` in id order, then load their wallets."""
        session = self.session
        where = (any_of(session, accounts_t.c.user_id, sorted(set(user_ids)))
                 if user_ids is not None
                 else any_of(session, accounts_t.c.id, sorted(set(account_ids or []))))
        rows = self.session.execute(
            select(accounts_t.c.id, accounts_t.c.user_id, accounts_t.c.plan_code,
                   accounts_t.c.timezone, accounts_t.c.last_renewal_at)
            .where(where)
            .order_by(accounts_t.c.id)
            .with_for_update()
        ).all()
        by_id: dict[int, AccountState] = {}
        for r in rows:
            state = AccountState(r.id, r.user_id, r.plan_code, r.timezone,
                                 as_utc(r.last_renewal_at))
            self.accounts[r.user_id] = state
            by_id[r.id] = state
        if by_id:
            for w in self.session.execute(
                select(wallets_t).where(any_of(session, wallets_t.c.account_id, list(by_id)))
                .order_by(wallets_t.c.id).with_for_update()
            ).all():
                by_id[w.account_id].wallets.append(WalletState(
                    w.id, w.account_id, w.wallet_type, w.balance, as_utc(w.expires_at),
                    w.is_active, as_utc(w.created_at), w.balance))

    def load(self, events: list[AnyEvent]) -> None:
        self.lock_accounts(user_ids=[e.user_id for e in events])

        originals = {e.original_key for e in events if isinstance(e, Refund)}
        keys = {e.key for e in events} | originals
        for r in self.session.execute(
            select(outcomes_t.c.key, outcomes_t.c.payload_hash, outcomes_t.c.outcome,
                   outcomes_t.c.reason, outcomes_t.c.result)
            .where(any_of(self.session, outcomes_t.c.key, keys))
        ).all():
            self.stored[r.key] = _Stored(r.payload_hash, r.outcome, r.reason, r.result)
        if originals:
            for r in self.session.execute(
                select(entries_t.c.event_key, entries_t.c.reference, entries_t.c.type,
                       entries_t.c.wallet_id, entries_t.c.amount, entries_t.c.account_id)
                .where(or_(and_(entries_t.c.type == "CHARGE",
                                any_of(self.session, entries_t.c.event_key, originals)),
                           and_(entries_t.c.type == "REFUND",
                                any_of(self.session, entries_t.c.reference, originals))))
            ).all():
                if r.type == "CHARGE":
                    self.charged[r.event_key][r.wallet_id] += -r.amount
                    self.charge_owner[r.event_key] = r.account_id
                else:
                    self.refunded[r.reference][r.wallet_id] += r.amount
        hold_ids = {e.hold_id for e in events
                    if isinstance(e, TokenProcessEnd) and e.hold_id is not None}
        if hold_ids:
            # Read after the account locks: every writer of a hold locks its account first,
            # so a hold of a locked account cannot change under us.
            for r in self.session.execute(select(holds_t).where(
                    any_of(self.session, holds_t.c.id, hold_ids))):
                self.holds[r.id] = HoldState.from_row(r)

    # -- writing -----------------------------------------------------------------------

    def entry(self, account: AccountState, wallet: WalletState, amount: int, type_: str,
              event_key: str | None, feature: str | None = None, reference: str | None = None,
              metadata: dict[str, Any] | None = None) -> None:
        before = wallet.balance
        wallet.balance += amount
        account.changed = True
        self.entries.append({
            "account_id": account.id, "wallet_id": wallet.id, "amount": amount,
            "balance_before": before, "balance_after": wallet.balance, "type": type_,
            "feature": feature, "event_key": event_key, "reference": reference,
            "metadata": metadata, "created_at": self.ctx.now,
        })

    def new_wallet(self, account: AccountState, wallet_type: str,
                   expires_at: datetime | None) -> WalletState:
        wallet_id = self.session.execute(
            wallets_t.insert().values(account_id=account.id, wallet_type=wallet_type, balance=0,
                                      expires_at=expires_at, is_active=True,
                                      created_at=self.ctx.now)
            .returning(wallets_t.c.id)
        ).scalar_one()
        wallet = WalletState(wallet_id, account.id, wallet_type, 0, expires_at, True,
                             self.ctx.now, 0)
        account.wallets.append(wallet)
        return wallet

    def flush(self) -> list[BalanceChange]:
        session = self.session
        set_balances(session, wallets_t, [(w.id, w.balance) for a in self.accounts.values()
                                          for w in a.wallets if w.dirty])
        seq: dict[int, int] = {}
        ids = copy_rows(session, entries_t, self.entries, "ledger_entries_id_seq")
        for entry_id, entry in zip(ids, self.entries, strict=True):
            seq[entry["account_id"]] = max(seq.get(entry["account_id"], 0), entry_id)
        stored_at = utcnow()  # when the outcome was stored: just before commit
        for outcome in self.outcomes:
            outcome["created_at"] = stored_at
        copy_rows(session, outcomes_t, self.outcomes)
        if self.hold_updates:
            done = session.execute(
                update(holds_t)
                .where(holds_t.c.id == bindparam("_id"), holds_t.c.status == "open")
                .values(status=bindparam("_status"), resolved_at=bindparam("_at"),
                        resolved_by=bindparam("_by")),
                self.hold_updates, execution_options={"synchronize_session": False},
            ).rowcount
            if done != len(self.hold_updates):
                # Every resolver locks the account first, so this cannot happen; if it
                # does, roll back rather than resolve a hold twice.
                raise RetryableConflict("a hold was resolved concurrently")
        now = self.ctx.now
        return [BalanceChange(a.user_id, a.balance(now), seq[a.id])
                for a in self.accounts.values() if a.id in seq]

    def store(self, event: AnyEvent, digest: str, result: EventResult) -> None:
        self.outcomes.append({
            "key": event.key, "payload_hash": digest, "user_id": event.user_id,
            "event_type": event.type, "outcome": result.status, "reason": result.reason,
            "result": result.data, "created_at": self.ctx.now,
        })
        self.stored[event.key] = _Stored(digest, result.status, result.reason, result.data)


def _stored_result(key: str, stored: _Stored) -> EventResult:
    return EventResult(key, stored.outcome, stored.reason, stored.result or {})


def apply_events(session: Session, events: list[AnyEvent], ctx: ApplyContext) -> BatchResult:
    """Apply validated events in order, each key at most once, in the caller's transaction.

    Duplicates return the stored outcome and change nothing; a reused key with another
    payload is recorded as a conflict; events for unknown accounts are dead-lettered.
    """
    batch = _Batch(session, ctx)
    batch.load(events)
    results: list[EventResult] = []
    deferred: list[AnyEvent] = []
    dead: list[tuple[AnyEvent, str]] = []
    conflicts: list[dict[str, Any]] = []

    for event in events:
        digest = event.payload_hash()
        stored = batch.stored.get(event.key)
        if stored is not None:
            if stored.payload_hash == digest:
                prior = _stored_result(event.key, stored)
                results.append(EventResult(event.key, "duplicate", prior.reason,
                                           {"outcome": prior.status, **prior.data}))
            else:
                conflicts.append({"key": event.key, "payload_hash": digest,
                                  "payload": event.to_message(), "seen_at": ctx.now})
                results.append(EventResult(
                    event.key, "conflict",
                    "key already used with a different payload; not applied"))
            continue
        if isinstance(event, OpenAccount):
            result = _open(batch, event)
        else:
            account = batch.accounts.get(event.user_id)
            if account is None:
                dead.append((event, "account not found"))
                results.append(EventResult(event.key, "dead_lettered", "account not found"))
                continue
            try:
                result = _APPLY[type(event)](batch, account, event)
            except InsufficientTokens as exc:
                result = EventResult(event.key, "declined", str(exc),
                                     {"required": exc.required, "available": exc.available,
                                      "balance": account.balance(ctx.now)})
            except _Reject as exc:
                result = EventResult(event.key, "rejected", str(exc),
                                     {"balance": account.balance(ctx.now)})
            except _Defer as exc:
                deferred.append(event)
                results.append(EventResult(event.key, "deferred", str(exc)))
                continue
        batch.store(event, digest, result)
        results.append(result)

    changes = batch.flush()
    if conflicts:
        session.execute(insert_for(session)(EventConflict).on_conflict_do_nothing(), conflicts)
    for event, reason in dead:
        record_dead_letter(session, event.to_message(), reason, ctx.now, key=event.key)
    return BatchResult(results, deferred, len(dead), changes)


# -- the rules, one function per event type ----------------------------------------------


def _open(batch: _Batch, event: OpenAccount) -> EventResult:
    ctx = batch.ctx
    if event.user_id in batch.accounts:
        return EventResult(event.key, "rejected", "account already exists",
                           {"balance": batch.accounts[event.user_id].balance(ctx.now)})
    plan_code = event.plan or ctx.catalog.default_plan
    plan = ctx.catalog.plans.get(plan_code)
    if plan is None:
        return EventResult(event.key, "rejected", f"unknown plan {plan_code!r}")
    tz = event.timezone or ctx.default_timezone
    account_id = batch.session.execute(
        insert_for(batch.session)(Account)
        .values(user_id=event.user_id, plan_code=plan_code, timezone=tz, created_at=ctx.now,
                last_renewal_at=ctx.now, last_reset_on=local_date(ctx.now, tz))
        .on_conflict_do_nothing(index_elements=["user_id"])
        .returning(accounts_t.c.id)
    ).scalar_one_or_none()
    if account_id is None:
        # Opened by a concurrent transaction after our lock query: the retry sees it.
        raise RetryableConflict(f"account {event.user_id!r} was opened concurrently")
    account = AccountState(account_id, event.user_id, plan_code, tz, ctx.now)
    batch.accounts[event.user_id] = account
    standard = batch.new_wallet(account, STANDARD, None)
    opening = plan.allocation if plan.opening_tokens is None else plan.opening_tokens
    if opening:
        batch.entry(account, standard, opening, "OPEN", event.key,
                    metadata={"plan": plan_code})
    return EventResult(event.key, "applied", None,
                       {"plan": plan_code, "timezone": tz, "balance": account.balance(ctx.now)})


def _price(batch: _Batch, account: AccountState, feature: str | None,
           amount: int | None) -> int:
    catalog = batch.ctx.catalog
    if feature is not None:
        spec = catalog.features.get(feature)
        if spec is None:
            raise _Reject(f"unknown feature {feature!r}")
        if not catalog.plan_includes(account.plan_code, feature):
            raise _Reject("Feature endpoint is not available in your package")
        if amount is None:
            if spec.pricing == "usage":
                return spec.min_cost
            return spec.cost
    assert amount is not None
    return amount


def draw(batch: _Batch, account: AccountState, cost: int, *, key: str, type_: str,
         feature: str | None, allow_overdraft: bool, preferred: str | None,
         metadata: dict[str, Any] | None = None,
         order: list[WalletState] | None = None) -> list[dict[str, Any]]:
    """Take ``cost`` from the account's wallets in draw order (or the given ``order`` of
    live wallets); one entry per wallet touched.

    Raises InsufficientTokens (nothing changed) unless overdraft is allowed, in which case
    the shortfall is taken from the STANDARD wallet, which may go negative.
    """
    now = batch.ctx.now
    available = account.available(now)
    if cost > available and not allow_overdraft:
        raise InsufficientTokens(cost, available)
    taken: dict[int, int] = {}
    remaining = cost
    order = (draw_order(account, batch.ctx.catalog, now, preferred) if order is None
             else list(order))
    for wallet in order:
        if remaining == 0:
            break
        take = min(remaining, max(wallet.balance, 0))
        if take:
            taken[wallet.id] = take
            remaining -= take
    if remaining:
        standard = account.standard() or batch.new_wallet(account, STANDARD, None)
        taken[standard.id] = taken.get(standard.id, 0) + remaining
        if standard not in order:
            order.append(standard)
    touched = []
    for wallet in order:
        amount = taken.get(wallet.id)
        if amount:
            batch.entry(account, wallet, -amount, type_, key, feature, metadata=metadata)
            touched.append({"wallet_id": wallet.id, "wallet_type": wallet.wallet_type,
                            "amount": amount})
    return touched


def _charge(batch: _Batch, account: AccountState, event: Charge) -> EventResult:
    cost = _price(batch, account, event.feature, event.amount)
    touched: list[dict[str, Any]] = []
    if cost:
        touched = draw(batch, account, cost, key=event.key, type_="CHARGE",
                       feature=event.feature, allow_overdraft=event.allow_overdraft,
                       preferred=event.preferred_wallet_type, metadata=event.metadata)
        batch.charged[event.key] = defaultdict(int, {t["wallet_id"]: t["amount"]
                                                     for t in touched})
        batch.charge_owner[event.key] = account.id
    return EventResult(event.key, "applied", None,
                       {"charged": cost, "balance": account.balance(batch.ctx.now),
                        "wallets": touched})


def _credit(batch: _Batch, account: AccountState, event: Credit) -> EventResult:
    now = batch.ctx.now
    expires_at = event.expires_at
    if expires_at is not None and expires_at <= now:
        raise _Reject("expires_at is in the past")
    if event.wallet_type == STANDARD and expires_at is not None:
        raise _Reject("the STANDARD wallet never expires; omit expires_at")
    wallet = account.find(event.wallet_type, expires_at)
    if wallet is None:
        wallet = batch.new_wallet(account, event.wallet_type, expires_at)
    metadata = dict(event.metadata or {})
    if event.reason:
        metadata["reason"] = event.reason
    batch.entry(account, wallet, event.amount, "CREDIT", event.key, metadata=metadata or None)
    return EventResult(event.key, "applied", None,
                       {"credited": event.amount, "wallet_id": wallet.id,
                        "wallet_type": wallet.wallet_type, "balance": account.balance(now)})


def _refund(batch: _Batch, account: AccountState, event: Refund) -> EventResult:
    now = batch.ctx.now
    original = event.original_key
    charged = batch.charged.get(original)
    if not charged:
        stored = batch.stored.get(original)
        if stored is None:
            raise _Defer(f"original charge {original!r} is not applied yet")
        raise _Reject(f"original event {original!r} charged nothing to refund "
                      f"(it was {stored.outcome})")
    if batch.charge_owner.get(original) != account.id:
        raise _Reject(f"original charge {original!r} belongs to another account")
    refunded = batch.refunded[original]
    refundable = {w: c - refunded.get(w, 0) for w, c in charged.items()}
    left = sum(refundable.values())
    if left <= 0:
        raise _Reject(f"original charge {original!r} is already fully refunded")
    amount = left if event.amount is None else event.amount
    if amount > left:
        raise _Reject(f"refund exceeds what is left to refund (requested {amount}, "
                      f"refundable {left})")
    by_id = {w.id: w for w in account.wallets}
    standard = account.standard() or batch.new_wallet(account, STANDARD, None)
    targets: dict[int, int] = defaultdict(int)
    remaining = amount
    for wallet_id, can in refundable.items():
        if remaining == 0:
            break
        give = min(can, remaining)
        if give <= 0:
            continue
        refunded[wallet_id] += give
        remaining -= give
        wallet = by_id.get(wallet_id)
        # Credits whose wallet expired since the charge come back to STANDARD.
        target = wallet if wallet is not None and wallet.live(now) else standard
        targets[target.id] += give
    metadata = dict(event.metadata or {})
    metadata["reason"] = event.reason or "unspecified"
    touched = []
    for wallet_id, give in targets.items():
        wallet = by_id.get(wallet_id, standard)
        batch.entry(account, wallet, give, "REFUND", event.key, reference=original,
                    metadata=metadata)
        touched.append({"wallet_id": wallet.id, "wallet_type": wallet.wallet_type,
                        "amount": give})
    return EventResult(event.key, "applied", None,
                       {"refunded": amount, "reason": metadata["reason"],
                        "balance": account.balance(now), "wallets": touched})


def _token_process_end(batch: _Batch, account: AccountState,
                       event: TokenProcessEnd) -> EventResult:
    # The token process's rules live with it; imported here to avoid an import cycle.
    from tokenledger.tokenprocess.service import end

    return end(batch, account, event)


_APPLY: dict[type, Any] = {
    Charge: _charge,
    Credit: _credit,
    Refund: _refund,
    TokenProcessEnd: _token_process_end,
}


def record_dead_letter(session: Session, payload: Any, reason: str, now: datetime,
                       key: str | None = None) -> None:
    """Keep a message that cannot be applied; a repeat bumps attempts and last_seen."""
    text = payload if isinstance(payload, str) else json.dumps(payload, default=str)
    stmt = insert_for(session)(DeadLetter).values(
        fingerprint=fingerprint(payload), key=key, payload=text[:1_000_000],
        reason=reason[:2000], attempts=1, first_seen=now, last_seen=now)
    stmt = stmt.on_conflict_do_update(
        index_elements=["fingerprint"],
        set_={"attempts": DeadLetter.__table__.c.attempts + 1, "last_seen": now,
              "reason": reason[:2000]},
    )
    session.execute(stmt)
