"""The token-process start on PostgreSQL in two pipelined round trips (plus the commit).

The start is the one synchronous write of the ledger, so its latency is the caller's.
The general batch path (``ledger.service._Batch``) spends a round trip per statement and
uses COPY and sequence prefetches that pay off for 1,000 events, not for one. Here:

1. one pipeline: ``BEGIN``, lock the account ``FOR UPDATE`` (drawing the hold's id from
   its sequence in the same statement), then lock and read its wallets, then (with a key)
   read the stored outcome. The statements run one after another on the server, so the
   wallets and the outcome are read with a snapshot taken *after* the account lock was
   granted: a start that waited for another writer sees that writer's committed wallets,
   including a wallet it created, exactly as the batch path does;
2. the decision in memory (plan, estimate, draw order);
3. one pipeline: the hold, its ``HOLD`` entries, the wallet balances, the outcome row and
   the low-balance state, as plain prepared INSERT/UPDATE statements.

Same rows, same arithmetic, same answers as the portable path in ``service.py`` (which
SQLite uses); the tests run both through the same API.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from psycopg.types.json import Jsonb
from sqlalchemy.orm import Session

from tokenledger import notify
from tokenledger.catalog import Catalog
from tokenledger.errors import AccountNotFound, IdempotencyConflict
from tokenledger.ledger.service import BalanceChange
from tokenledger.ledger.wallets import AccountState, WalletState, draw_order
from tokenledger.pricing import estimate_hold, resolve_model
from tokenledger.timeutil import as_utc
from tokenledger.tokenprocess.models import OPEN

_LOCK_ACCOUNT = (
    "SELECT id, plan_code, timezone, last_renewal_at, nextval('holds_id_seq')"
    " FROM accounts WHERE user_id = %s FOR UPDATE")
_LOCK_WALLETS = (
    "SELECT id, wallet_type, balance, expires_at, is_active, created_at FROM wallets"
    " WHERE account_id = (SELECT id FROM accounts WHERE user_id = %s)"
    " ORDER BY id FOR UPDATE")
_STORED = "SELECT payload_hash, result FROM event_outcomes WHERE key = %s"
_INSERT_HOLD = (
    "INSERT INTO holds (id, key, account_id, user_id, feature, model, amount, allocations,"
    " status, expires_at, created_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)")
_INSERT_ENTRY = (
    "INSERT INTO ledger_entries (account_id, wallet_id, amount, balance_before,"
    " balance_after, type, feature, event_key, metadata, created_at)"
    " VALUES (%s, %s, %s, %s, %s, 'HOLD', %s, %s, %s, %s) RETURNING id")
_SET_BALANCE = "UPDATE wallets SET balance = %s WHERE id = %s"
_INSERT_OUTCOME = (
    "INSERT INTO event_outcomes (key, payload_hash, user_id, event_type, outcome, result,"
    " created_at) VALUES (%s, %s, %s, %s, 'applied', %s, %s)")


Started = tuple[Any, list[BalanceChange], list[notify.BalanceNotice]]


def start(session: Session, user_id: str, feature_endpoint_id: str, *, now: datetime,
          hold_ttl_seconds: int, max_output_tokens: int | None, hold: int | None,
          model: str | None, key: str | None, catalog: Catalog, digest: str,
          with_notices: bool = False) -> Started:
    """``service.start`` on PostgreSQL: (result, balance changes, notices).

    With ``with_notices`` the low-balance state is kept in the write pipeline and the
    notices to publish once committed are returned (with no changes left to stage);
    without, the changes are returned for ``notify.stage`` and no notices.
    """
    raw = session.connection().connection.driver_connection
    # One pipeline for the whole start: fetching the reads flushes them (one round trip),
    # leaving the block sends the writes and waits for them (another).
    with raw.pipeline():
        done = _start(raw, user_id, feature_endpoint_id, now, hold_ttl_seconds,
                      max_output_tokens, hold, model, key, catalog, digest, with_notices)
    return done.finish() if isinstance(done, _Written) else done


def _start(raw: Any, user_id: str, feature_endpoint_id: str, now: datetime,
           hold_ttl_seconds: int, max_output_tokens: int | None, hold: int | None,
           model: str | None, key: str | None, catalog: Catalog, digest: str,
           with_notices: bool) -> Started | _Written:
    from tokenledger.tokenprocess import service as sv

    locked = raw.execute(_LOCK_ACCOUNT, (user_id,))
    wallets = raw.execute(_LOCK_WALLETS, (user_id,))
    stored_cur = raw.execute(_STORED, (key,)) if key is not None else None
    row = locked.fetchone()
    if row is None:
        raise AccountNotFound(user_id)
    account_id, plan_code, timezone, last_renewal_at, hold_id = row
    account = AccountState(account_id, user_id, plan_code, timezone, as_utc(last_renewal_at))
    account.wallets = [WalletState(w[0], account_id, w[1], w[2], as_utc(w[3]), w[4],
                                   as_utc(w[5]), w[2]) for w in wallets.fetchall()]
    stored = stored_cur.fetchone() if stored_cur is not None else None

    available = account.available(now)
    if stored is not None:
        if stored[0] != digest or not stored[1]:
            raise IdempotencyConflict(key)
        return sv._stored_start(stored[1], available), [], []
    feature = catalog.features.get(feature_endpoint_id)
    if feature is None or not catalog.plan_includes(plan_code, feature_endpoint_id):
        return sv.StartResult(sv.NOT_ACCESSIBLE, available, sv.NOT_IN_PACKAGE,
                              user_id=user_id, feature_endpoint_id=feature_endpoint_id), [], []
    amount = estimate_hold(catalog, feature, max_output_tokens=max_output_tokens, hold=hold,
                           model=model)
    if amount > available:
        return sv.StartResult(sv.NOT_ACCESSIBLE, available, sv.INSUFFICIENT, user_id=user_id,
                              feature_endpoint_id=feature_endpoint_id, required=amount), [], []

    hold_key = key or f"hold:{uuid.uuid4().hex}"
    expires_at = now + timedelta(seconds=hold_ttl_seconds)
    chosen = resolve_model(catalog, feature, model) if feature.pricing == "usage" else model
    meta: dict[str, Any] = {"expires_at": expires_at.isoformat()}
    if chosen:
        meta["model"] = chosen
    if max_output_tokens is not None:
        meta["max_output_tokens"] = max_output_tokens
    meta["hold_id"] = hold_id
    # Draw as ``ledger.service.draw`` does; amount <= available, so no overdraft.
    allocations: list[dict[str, Any]] = []
    entries: list[tuple[Any, ...]] = []
    remaining = amount
    for wallet in draw_order(account, catalog, now, None) if amount else ():
        if remaining == 0:
            break
        take = min(remaining, max(wallet.balance, 0))
        if take:
            before = wallet.balance
            wallet.balance -= take
            remaining -= take
            allocations.append({"wallet_id": wallet.id, "wallet_type": wallet.wallet_type,
                                "amount": take})
            entries.append((account_id, wallet.id, -take, before, wallet.balance,
                            feature_endpoint_id, hold_key, Jsonb(meta), now))
    assert remaining == 0, (amount, available)
    token = account.available(now)
    result = sv.StartResult(sv.ACCESSIBLE, token, None, hold_id, user_id, feature_endpoint_id,
                            amount, None, expires_at)
    balance = account.balance(now)
    plan = catalog.plans.get(plan_code)
    low = (notify.low_balance_statement(user_id, balance,
                                        plan.low_balance_threshold if plan else None, now)
           if entries and with_notices else None)

    raw.execute(_INSERT_HOLD, (hold_id, hold_key, account_id, user_id, feature_endpoint_id,
                               chosen, amount, Jsonb(allocations), OPEN, expires_at, now))
    entry_curs = [raw.execute(_INSERT_ENTRY, e) for e in entries]
    for wallet in account.wallets:
        if wallet.dirty:
            raw.execute(_SET_BALANCE, (wallet.balance, wallet.id))
    # The outcome row makes the hold key a first-class event key: verify sees its entries
    # as applied, and a retried start with the same key finds its answer here.
    raw.execute(_INSERT_OUTCOME, (hold_key, digest, user_id, sv.START_EVENT,
                                  Jsonb(result.as_dict()), now))
    low_cur = raw.execute(low[0], low[1]) if low is not None else None
    return _Written(result, balance, entry_curs, low, low_cur)


@dataclass(slots=True)
class _Written:
    """Writes queued in the pipeline whose answers are read once it has been synced."""

    result: Any
    balance: int
    entries: list[Any]
    low: tuple[str, tuple[Any, ...], bool] | None
    low_cur: Any

    def finish(self) -> Started:
        if not self.entries:
            return self.result, [], []
        user_id = self.result.user_id
        seq = max(cur.fetchone()[0] for cur in self.entries)
        if self.low is None:
            return self.result, [BalanceChange(user_id, self.balance, seq)], []
        notices = [notify.BalanceNotice(notify.BALANCE_CHANGED, user_id, self.balance, seq)]
        if self.low[2] and self.low_cur.fetchone() is not None:
            notices.append(notify.BalanceNotice(notify.BALANCE_LOW, user_id, self.balance,
                                                seq, self.low[1][1]))
        return self.result, [], notices
