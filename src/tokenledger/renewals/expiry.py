"""Wallet expiry: wallets past ``expires_at`` are zeroed by an ``EXPIRY`` entry each."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from sqlalchemy import and_, bindparam, func, or_, select, update

from tokenledger.db.bulk import any_of, insert_rows
from tokenledger.db.uow import UnitOfWork
from tokenledger.ledger.models import Account, EventOutcome, LedgerEntry, Wallet
from tokenledger.notify import service as notify
from tokenledger.notify.service import BalanceChange
from tokenledger.timeutil import as_utc

accounts_t = Account.__table__
wallets_t = Wallet.__table__
entries_t = LedgerEntry.__table__
outcomes_t = EventOutcome.__table__


@dataclass(frozen=True, slots=True)
class ExpiryResult:
    """Wallets zeroed by one expiry batch; ``more`` when another batch should follow."""

    wallets: int
    tokens: int
    accounts: int
    more: bool


def expire_wallets(uow: UnitOfWork, limit: int = 1000) -> ExpiryResult:
    """Zero wallets past ``expires_at`` with an ``EXPIRY`` entry each, for up to ``limit``
    accounts; their notices are published once the unit of work commits. Safe to run
    twice."""
    session, now = uow.session, uow.now
    w = wallets_t.c
    expired = and_(w.expires_at.is_not(None), w.expires_at <= now, w.balance != 0)
    account_ids = list(session.scalars(
        select(w.account_id).where(expired).group_by(w.account_id).order_by(w.account_id)
        .limit(limit)))
    if not account_ids:
        return ExpiryResult(0, 0, 0, False)
    locked = {r.id: (r.user_id, r.plan_code) for r in session.execute(
        select(accounts_t.c.id, accounts_t.c.user_id, accounts_t.c.plan_code)
        .where(any_of(accounts_t.c.id, account_ids))
        .order_by(accounts_t.c.id).with_for_update())}
    # Re-read under the locks: a charge may have emptied a wallet meanwhile.
    wallets = session.execute(
        select(w.id, w.account_id, w.balance, w.wallet_type, w.expires_at)
        .where(expired, any_of(w.account_id, list(locked))).order_by(w.id)).all()
    if not wallets:
        return ExpiryResult(0, 0, len(locked), len(account_ids) == limit)
    keys = {wl.id: f"expiry:{wl.id}" for wl in wallets}
    taken = set(session.scalars(select(outcomes_t.c.key)
                                .where(any_of(outcomes_t.c.key, list(keys.values())))))
    for wallet_id, key in keys.items():
        if key in taken:  # credited again after an earlier expiry: a new key per expiry
            keys[wallet_id] = f"{key}:{now.isoformat()}"
    session.execute(
        update(wallets_t).where(w.id == bindparam("_id")).values(balance=0),
        [{"_id": wl.id} for wl in wallets], execution_options={"synchronize_session": False})
    entry_ids = insert_rows(session, entries_t, [{
        "account_id": wl.account_id, "wallet_id": wl.id, "amount": -wl.balance,
        "balance_before": wl.balance, "balance_after": 0, "type": "EXPIRY",
        "event_key": keys[wl.id],
        "metadata": {"wallet_type": wl.wallet_type,
                     "expired_at": as_utc(wl.expires_at).isoformat()},
        "created_at": now} for wl in wallets], returning=("id", "account_id"))
    insert_rows(session, outcomes_t, [{
        "key": keys[wl.id],
        "payload_hash": hashlib.sha256(json.dumps(
            ["expiry", wl.id, wl.balance]).encode()).hexdigest(),
        "user_id": locked[wl.account_id][0], "event_type": "expiry", "outcome": "applied",
        "reason": None, "result": {"expired": wl.balance, "wallet_id": wl.id,
                                   "wallet_type": wl.wallet_type},
        "created_at": now} for wl in wallets])
    seqs: dict[int, int] = {}
    for row in entry_ids:
        seqs[row.account_id] = max(seqs.get(row.account_id, 0), row.id)
    balances = dict(session.execute(
        select(w.account_id, func.sum(w.balance))
        .where(any_of(w.account_id, list(seqs)), w.is_active,
               or_(w.expires_at.is_(None), w.expires_at > now))
        .group_by(w.account_id)).all())
    plans = uow.catalog.plans
    notify.stage(uow, [BalanceChange(
        locked[account_id][0], int(balances.get(account_id) or 0), seq,
        plans[locked[account_id][1]].low_balance_threshold
        if locked[account_id][1] in plans else None) for account_id, seq in seqs.items()])
    return ExpiryResult(len(wallets), sum(wl.balance for wl in wallets), len(locked),
                        len(account_ids) == limit)
