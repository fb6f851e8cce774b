"""A batch of ledger writes in one unit of work: locks, in-memory state, set-based writes.

Every writer of balances (events, token-process starts and ends, hold expiry) goes
through a :class:`Batch`:

1. lock the accounts ``FOR UPDATE`` in id order. Every writer locks accounts before
   touching their wallets, so the account row is the single serialization point and a
   fixed order rules out deadlocks;
2. only then read the stored outcomes and wallets: under READ COMMITTED each statement
   sees what committed before it, so a batch that waited for a lock sees the winner's
   outcome rows and treats a redelivered key as a duplicate instead of applying it again;
3. change balances in memory (``entry``, ``draw``), then write wallets, entries, outcomes
   and hold resolutions with a handful of set-based statements (``flush``).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, bindparam, or_, select, update
from sqlalchemy.orm import Session

from tokenledger.db.bulk import any_of, copy_rows, set_balances
from tokenledger.db.uow import UnitOfWork
from tokenledger.errors import InsufficientTokens, RetryableConflict
from tokenledger.ledger.models import STANDARD, EventOutcome, LedgerEntry, Wallet
from tokenledger.ledger.models import Account as _Account
from tokenledger.ledger.wallets import AccountState, WalletState, allocate, draw_order
from tokenledger.notify.service import BalanceChange
from tokenledger.results import EventResult
from tokenledger.timeutil import as_utc, utcnow
from tokenledger.tokenprocess.models import OPEN, Hold, HoldState

accounts_t = _Account.__table__
wallets_t = Wallet.__table__
entries_t = LedgerEntry.__table__
outcomes_t = EventOutcome.__table__
holds_t = Hold.__table__


class Rejected(Exception):
    """An event that is final and stored as ``rejected`` (bad reference, unknown feature)."""


class Deferred(Exception):
    """An event that must wait for another (a refund whose charge is not applied yet)."""


@dataclass(slots=True)
class Stored:
    """An outcome stored by an earlier transaction."""

    payload_hash: str
    outcome: str
    reason: str | None
    result: dict[str, Any] | None

    def as_result(self, key: str) -> EventResult:
        return EventResult(key, self.outcome, self.reason, self.result or {})


class Batch:
    """The in-memory state of one batch of writes while they are decided in order."""

    def __init__(self, uow: UnitOfWork) -> None:
        self.uow = uow
        self.session: Session = uow.session
        self.now: datetime = uow.now
        self.accounts: dict[str, AccountState] = {}
        self.stored: dict[str, Stored] = {}
        self.entries: list[dict[str, Any]] = []
        self.outcomes: list[dict[str, Any]] = []
        # CHARGE and REFUND amounts per original key and wallet, for refunds.
        self.charged: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        self.refunded: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        self.charge_owner: dict[str, int] = {}
        # Holds named by the batch's events, and their status changes to write.
        self.holds: dict[int, HoldState] = {}
        self.hold_updates: list[dict[str, Any]] = []

    # -- loading -----------------------------------------------------------------------

    def lock_accounts(self, user_ids: list[str] | None = None,
                      account_ids: list[int] | None = None) -> None:
        """Lock the named accounts ``FOR UPDATE`` in id order, then load their wallets."""
        where = (any_of(accounts_t.c.user_id, sorted(set(user_ids)))
                 if user_ids is not None
                 else any_of(accounts_t.c.id, sorted(set(account_ids or []))))
        rows = self.session.execute(
            select(accounts_t.c.id, accounts_t.c.user_id, accounts_t.c.plan_code,
                   accounts_t.c.timezone, accounts_t.c.last_renewal_at,
                   accounts_t.c.closed_at)
            .where(where)
            .order_by(accounts_t.c.id)
            .with_for_update()
        ).all()
        by_id: dict[int, AccountState] = {}
        for r in rows:
            state = AccountState(r.id, r.user_id, r.plan_code, r.timezone,
                                 as_utc(r.last_renewal_at), closed_at=as_utc(r.closed_at))
            self.accounts[r.user_id] = state
            by_id[r.id] = state
        if by_id:
            for w in self.session.execute(
                select(wallets_t).where(any_of(wallets_t.c.account_id, list(by_id)))
                .order_by(wallets_t.c.id).with_for_update()
            ).all():
                by_id[w.account_id].wallets.append(WalletState(
                    w.id, w.account_id, w.wallet_type, w.balance, as_utc(w.expires_at),
                    w.is_active, as_utc(w.created_at), w.balance))

    def load_outcomes(self, keys: set[str]) -> None:
        """The stored outcomes of ``keys`` (read after the account locks)."""
        if not keys:
            return
        for r in self.session.execute(
            select(outcomes_t.c.key, outcomes_t.c.payload_hash, outcomes_t.c.outcome,
                   outcomes_t.c.reason, outcomes_t.c.result)
            .where(any_of(outcomes_t.c.key, keys))
        ).all():
            self.stored[r.key] = Stored(r.payload_hash, r.outcome, r.reason, r.result)

    def load_charges(self, originals: set[str]) -> None:
        """What each original key charged and what was refunded of it, per wallet."""
        if not originals:
            return
        for r in self.session.execute(
            select(entries_t.c.event_key, entries_t.c.reference, entries_t.c.type,
                   entries_t.c.wallet_id, entries_t.c.amount, entries_t.c.account_id)
            .where(or_(and_(entries_t.c.type == "CHARGE",
                            any_of(entries_t.c.event_key, originals)),
                       and_(entries_t.c.type == "REFUND",
                            any_of(entries_t.c.reference, originals))))
        ).all():
            if r.type == "CHARGE":
                self.charged[r.event_key][r.wallet_id] += -r.amount
                self.charge_owner[r.event_key] = r.account_id
            else:
                self.refunded[r.reference][r.wallet_id] += r.amount

    def load_holds(self, hold_ids: set[int]) -> None:
        """The named holds. Read after the account locks: every writer of a hold locks
        its account first, so a hold of a locked account cannot change under us."""
        if not hold_ids:
            return
        for r in self.session.execute(select(holds_t).where(any_of(holds_t.c.id, hold_ids))):
            self.holds[r.id] = HoldState.from_row(r)

    def load_open_holds(self, account_ids: set[int]) -> None:
        """Every open hold of these (locked) accounts, for the ends that name none."""
        if not account_ids:
            return
        for r in self.session.execute(select(holds_t).where(
                any_of(holds_t.c.account_id, sorted(account_ids)), holds_t.c.status == OPEN)):
            self.holds.setdefault(r.id, HoldState.from_row(r))

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
            "metadata": metadata, "created_at": self.now,
        })

    def new_wallet(self, account: AccountState, wallet_type: str,
                   expires_at: datetime | None) -> WalletState:
        wallet_id = self.session.execute(
            wallets_t.insert().values(account_id=account.id, wallet_type=wallet_type, balance=0,
                                      expires_at=expires_at, is_active=True,
                                      created_at=self.now)
            .returning(wallets_t.c.id)
        ).scalar_one()
        wallet = WalletState(wallet_id, account.id, wallet_type, 0, expires_at, True,
                             self.now, 0)
        account.wallets.append(wallet)
        return wallet

    def draw(self, account: AccountState, cost: int, *, key: str, type_: str,
             feature: str | None, allow_overdraft: bool, preferred: str | None,
             metadata: dict[str, Any] | None = None,
             order: list[WalletState] | None = None) -> list[dict[str, Any]]:
        """Take ``cost`` from the account's wallets in draw order (or the given ``order``
        of live wallets); one entry per wallet touched.

        Raises InsufficientTokens (nothing changed) unless overdraft is allowed, in which
        case the shortfall is taken from the STANDARD wallet, which may go negative.
        """
        available = account.available(self.now)
        if cost > available and not allow_overdraft:
            raise InsufficientTokens(cost, available)
        order = (draw_order(account, self.uow.catalog, self.now, preferred) if order is None
                 else list(order))
        taken, owed = allocate(order, cost)
        if owed:
            standard = account.standard() or self.new_wallet(account, STANDARD, None)
            taken.append((standard, owed))
        amounts: dict[int, int] = defaultdict(int)
        wallets: dict[int, WalletState] = {}
        for wallet, amount in taken:  # one entry per wallet, in draw order
            amounts[wallet.id] += amount
            wallets[wallet.id] = wallet
        touched = []
        for wallet_id, amount in amounts.items():
            wallet = wallets[wallet_id]
            self.entry(account, wallet, -amount, type_, key, feature, metadata=metadata)
            touched.append({"wallet_id": wallet.id, "wallet_type": wallet.wallet_type,
                            "amount": amount})
        return touched

    def store(self, key: str, user_id: str, event_type: str, digest: str,
              result: EventResult, message_id: str | None = None) -> None:
        """Record ``result`` as the stored outcome of ``key`` (written by ``flush``), with
        the message that carried it."""
        self.outcomes.append({
            "key": key, "payload_hash": digest, "user_id": user_id,
            "event_type": event_type, "outcome": result.status, "reason": result.reason,
            "result": result.data, "created_at": self.now, "message_id": message_id,
        })
        self.stored[key] = Stored(digest, result.status, result.reason, result.data)

    def flush(self) -> list[BalanceChange]:
        """Write everything decided so far; the balance change of each account touched."""
        session = self.session
        set_balances(session, wallets_t, [(w.id, w.balance) for a in self.accounts.values()
                                          for w in a.wallets if w.dirty])
        for a in self.accounts.values():
            for w in a.wallets:
                w.start_balance = w.balance
        seq: dict[int, int] = {}
        ids = copy_rows(session, entries_t, self.entries, "ledger_entries_id_seq")
        for entry_id, entry in zip(ids, self.entries, strict=True):
            seq[entry["account_id"]] = max(seq.get(entry["account_id"], 0), entry_id)
        self.entries = []
        stored_at = utcnow()  # when the outcome was stored: just before commit
        for outcome in self.outcomes:
            outcome["created_at"] = stored_at
        copy_rows(session, outcomes_t, self.outcomes)
        self.outcomes = []
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
            self.hold_updates = []
        plans = self.uow.catalog.plans
        changes = []
        for a in self.accounts.values():
            if a.id in seq:
                plan = plans.get(a.plan_code)
                changes.append(BalanceChange(a.user_id, a.balance(self.now), seq[a.id],
                                             plan.low_balance_threshold if plan else None))
        return changes
