"""Applying events to the ledger: a batch in one unit of work, each key at most once.

Per event: a key already stored with the same payload hash is a ``duplicate`` (the stored
outcome is returned, nothing changes); with another hash a ``conflict`` (recorded in
``event_conflicts``, never applied); otherwise the event's rule runs and its outcome
(``applied``, ``declined`` or ``rejected``) is stored with its effect. The locking and
writing are :class:`~tokenledger.ledger.batch.Batch`'s.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.dialects.postgresql import insert

from tokenledger.db.uow import UnitOfWork
from tokenledger.errors import InsufficientTokens, RetryableConflict
from tokenledger.ledger.batch import Batch, Deferred, Rejected, accounts_t
from tokenledger.ledger.models import STANDARD, Account, EventConflict
from tokenledger.ledger.wallets import AccountState
from tokenledger.messages import (
    AnyEvent,
    Charge,
    Credit,
    OpenAccount,
    Refund,
    TokenProcessEnd,
)
from tokenledger.notify import service as notify
from tokenledger.notify.service import BalanceChange
from tokenledger.queue import deadletters
from tokenledger.results import EventResult
from tokenledger.timeutil import local_date
from tokenledger.tokenprocess import service as token_process

CONFLICT = "key already used with a different payload; not applied"


@dataclass(slots=True)
class BatchResult:
    results: list[EventResult]
    deferred: list[AnyEvent] = field(default_factory=list)
    dead_lettered: int = 0
    balance_changes: list[BalanceChange] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(1 for r in self.results if r.status == status)


def apply_events(uow: UnitOfWork, events: list[AnyEvent],
                 sources: dict[str, str] | None = None) -> BatchResult:
    """Apply validated events in order, each key at most once, in the caller's unit of
    work; their balance notices are published once it commits. ``sources`` names the
    message that carried each event key (stored with its outcome).

    Duplicates return the stored outcome and change nothing; a reused key with another
    payload is recorded as a conflict; events for unknown accounts are dead-lettered.
    """
    sources = sources or {}
    batch = Batch(uow)
    batch.lock_accounts(user_ids=[e.user_id for e in events])
    originals = {e.original_key for e in events if isinstance(e, Refund)}
    batch.load_outcomes({e.key for e in events} | originals)
    batch.load_charges(originals)
    batch.load_holds({e.hold_id for e in events
                      if isinstance(e, TokenProcessEnd) and e.hold_id is not None})
    batch.load_open_holds({batch.accounts[e.user_id].id for e in events
                           if isinstance(e, TokenProcessEnd) and e.hold_id is None
                           and e.user_id in batch.accounts})
    results: list[EventResult] = []
    deferred: list[AnyEvent] = []
    dead: list[tuple[AnyEvent, str]] = []
    conflicts: list[dict[str, Any]] = []

    for event in events:
        digest = event.payload_hash()
        stored = batch.stored.get(event.key)
        if stored is not None:
            if stored.payload_hash == digest:
                prior = stored.as_result(event.key)
                results.append(EventResult(event.key, "duplicate", prior.reason,
                                           {"outcome": prior.status, **prior.data}))
            else:
                conflicts.append({"key": event.key, "payload_hash": digest,
                                  "payload": event.to_message(), "seen_at": uow.now})
                results.append(EventResult(event.key, "conflict", CONFLICT))
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
                                      "balance": account.balance(uow.now)})
            except Rejected as exc:
                result = EventResult(event.key, "rejected", str(exc),
                                     {"balance": account.balance(uow.now)})
            except Deferred as exc:
                deferred.append(event)
                results.append(EventResult(event.key, "deferred", str(exc)))
                continue
        batch.store(event.key, event.user_id, event.type, digest, result,
                    sources.get(event.key))
        results.append(result)

    changes = batch.flush()
    if conflicts:
        uow.session.execute(insert(EventConflict).on_conflict_do_nothing(), conflicts)
    deadletters.record_many(uow.session, [(event.to_message(), reason, event.key)
                                          for event, reason in dead], uow.now)
    notify.stage(uow, changes)
    return BatchResult(results, deferred, len(dead), changes)


# -- the rules, one function per event type ----------------------------------------------


def _open(batch: Batch, event: OpenAccount) -> EventResult:
    uow = batch.uow
    if event.user_id in batch.accounts:
        return EventResult(event.key, "rejected", "account already exists",
                           {"balance": batch.accounts[event.user_id].balance(uow.now)})
    plan_code = event.plan or uow.catalog.default_plan
    try:
        uow.catalog.check_plan(plan_code)
    except ValueError as exc:
        return EventResult(event.key, "rejected", str(exc))
    plan = uow.catalog.plans[plan_code]
    tz = event.timezone or uow.settings.timezone
    account_id = batch.session.execute(
        insert(Account)
        .values(user_id=event.user_id, plan_code=plan_code, timezone=tz, created_at=uow.now,
                last_renewal_at=uow.now, last_reset_on=local_date(uow.now, tz))
        .on_conflict_do_nothing(index_elements=["user_id"])
        .returning(accounts_t.c.id)
    ).scalar_one_or_none()
    if account_id is None:
        # Opened by a concurrent transaction after our lock query: the retry sees it.
        raise RetryableConflict(f"account {event.user_id!r} was opened concurrently")
    account = AccountState(account_id, event.user_id, plan_code, tz, uow.now)
    batch.accounts[event.user_id] = account
    standard = batch.new_wallet(account, STANDARD, None)
    opening = plan.allocation if plan.opening_tokens is None else plan.opening_tokens
    if opening:
        batch.entry(account, standard, opening, "OPEN", event.key,
                    metadata={"plan": plan_code})
    return EventResult(event.key, "applied", None,
                       {"plan": plan_code, "timezone": tz, "balance": account.balance(uow.now)})


def _price(batch: Batch, account: AccountState, feature: str | None,
           amount: int | None) -> int:
    catalog = batch.uow.catalog
    if feature is not None:
        spec = catalog.features.get(feature)
        if spec is None:
            raise Rejected(f"unknown feature {feature!r}")
        if not catalog.plan_includes(account.plan_code, feature):
            raise Rejected("Feature endpoint is not available in your package")
        if amount is None:
            if spec.pricing == "usage":
                return spec.min_cost
            return spec.cost
    assert amount is not None
    return amount


def _check_wallet_type(batch: Batch, wallet_type: str | None) -> None:
    """Reject a wallet type the catalog does not declare (a typo would open its own)."""
    if wallet_type is not None:
        try:
            batch.uow.catalog.check_wallet_type(wallet_type)
        except ValueError as exc:
            raise Rejected(str(exc)) from None


def _charge(batch: Batch, account: AccountState, event: Charge) -> EventResult:
    if account.closed_at is not None:
        raise Rejected(f"account {account.user_id!r} is closed")
    _check_wallet_type(batch, event.preferred_wallet_type)
    cost = _price(batch, account, event.feature, event.amount)
    touched: list[dict[str, Any]] = []
    if cost:
        touched = batch.draw(account, cost, key=event.key, type_="CHARGE",
                       feature=event.feature, allow_overdraft=event.allow_overdraft,
                       preferred=event.preferred_wallet_type, metadata=event.metadata)
        batch.charged[event.key] = defaultdict(int, {t["wallet_id"]: t["amount"]
                                                     for t in touched})
        batch.charge_owner[event.key] = account.id
    return EventResult(event.key, "applied", None,
                       {"charged": cost, "balance": account.balance(batch.uow.now),
                        "wallets": touched})


def _credit(batch: Batch, account: AccountState, event: Credit) -> EventResult:
    now = batch.uow.now
    _check_wallet_type(batch, event.wallet_type)
    expires_at = event.expires_at
    if expires_at is not None and expires_at <= now:
        raise Rejected("expires_at is in the past")
    if event.wallet_type == STANDARD and expires_at is not None:
        raise Rejected("the STANDARD wallet never expires; omit expires_at")
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


def _refund(batch: Batch, account: AccountState, event: Refund) -> EventResult:
    now = batch.uow.now
    original = event.original_key
    charged = batch.charged.get(original)
    if not charged:
        stored = batch.stored.get(original)
        if stored is None:
            raise Deferred(f"original charge {original!r} is not applied yet")
        if stored.outcome == "applied" and (stored.result or {}).get("charged"):
            # It charged, and its entries are gone: a compaction folded them.
            raise Rejected(f"original charge {original!r} is older than the retention "
                           "cut-off (its entries were compacted); nothing to refund")
        raise Rejected(f"original event {original!r} charged nothing to refund "
                      f"(it was {stored.outcome})")
    if batch.charge_owner.get(original) != account.id:
        raise Rejected(f"original charge {original!r} belongs to another account")
    refunded = batch.refunded[original]
    refundable = {w: c - refunded.get(w, 0) for w, c in charged.items()}
    left = sum(refundable.values())
    if left <= 0:
        raise Rejected(f"original charge {original!r} is already fully refunded")
    amount = left if event.amount is None else event.amount
    if amount > left:
        raise Rejected(f"refund exceeds what is left to refund (requested {amount}, "
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


_APPLY: dict[type, Any] = {
    Charge: _charge,
    Credit: _credit,
    Refund: _refund,
    TokenProcessEnd: token_process.end,
}
