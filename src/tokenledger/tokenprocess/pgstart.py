"""The token-process start on PostgreSQL in four short statements (plus the commit).

The start is the one synchronous write of the ledger, so its latency is the caller's.
The general batch path (``ledger.service._Batch``) spends a round trip per statement and
uses COPY and sequence prefetches that pay off for 1,000 events, not for one. Here:

1. lock the account ``FOR UPDATE``, drawing the hold's id from its sequence in the same
   statement;
2. then lock and read its wallets (and, with a key, the stored outcome) in statements of
   their own: their snapshots are taken *after* the account lock was granted, so a start
   that waited for another writer sees that writer's committed wallets, including one it
   created, exactly as the batch path does;
3. decide in memory (plan, estimate, draw order);
4. write the hold, its ``HOLD`` entries, the wallets' balances, the outcome row and the
   low-balance state in one prepared statement of data-modifying CTEs.

Plain statements, not psycopg's pipeline mode: a pipeline saves round trips but its
client spins on the socket while the server works, which on a busy machine cost more
CPU than the round trips it saved.

Same rows, same arithmetic, same answers as the portable path in ``service.py`` (which
SQLite uses).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from psycopg.types.json import Jsonb
from sqlalchemy.orm import Session

from tokenledger import notify
from tokenledger.catalog import Catalog
from tokenledger.errors import AccountNotFound, IdempotencyConflict
from tokenledger.ledger.service import BalanceChange
from tokenledger.ledger.wallets import AccountState, WalletState, draw_order
from tokenledger.timeutil import as_utc

_LOCK_ACCOUNT = (
    "SELECT id, plan_code, timezone, last_renewal_at, nextval('holds_id_seq')"
    " FROM accounts WHERE user_id = %s FOR UPDATE")
_LOCK_WALLETS = (
    "SELECT id, wallet_type, balance, expires_at, is_active, created_at FROM wallets"
    " WHERE account_id = %s ORDER BY id FOR UPDATE")
_STORED = "SELECT payload_hash, result FROM event_outcomes WHERE key = %s"
# The whole write in one statement: the hold, one HOLD entry per wallet drawn (with the
# balances before and after), the wallets' new balances, the outcome row, and optionally
# the low-balance state (``low``, from notify). Answers the newest entry id (the change's
# ledger_seq; NULL when nothing was drawn) and whether ``low`` returned a row.
_WRITE = (
    "WITH hold AS (INSERT INTO holds (id, key, account_id, user_id, feature, model, amount,"
    " allocations, status, expires_at, created_at) VALUES (%(hold_id)s, %(key)s,"
    " %(account_id)s, %(user_id)s, %(feature)s, %(model)s, %(amount)s, %(allocations)s,"
    " 'open', %(expires_at)s, %(now)s)),"
    " entries AS (INSERT INTO ledger_entries (account_id, wallet_id, amount, balance_before,"
    " balance_after, type, feature, event_key, metadata, created_at)"
    " SELECT %(account_id)s, t.wallet_id, -t.taken, t.before, t.before - t.taken, 'HOLD',"
    " %(feature)s, %(key)s, %(meta)s, %(now)s"
    " FROM unnest(%(wallet_ids)s::bigint[], %(taken)s::bigint[], %(before)s::bigint[])"
    " WITH ORDINALITY AS t(wallet_id, taken, before, n) ORDER BY t.n RETURNING id),"
    " balances AS (UPDATE wallets SET balance = v.before - v.taken"
    " FROM unnest(%(wallet_ids)s::bigint[], %(taken)s::bigint[], %(before)s::bigint[])"
    " AS v(id, taken, before) WHERE wallets.id = v.id),"
    " outcome AS (INSERT INTO event_outcomes (key, payload_hash, user_id, event_type,"
    " outcome, result, created_at) VALUES (%(key)s, %(digest)s, %(user_id)s, %(event)s,"
    " 'applied', %(result)s, %(now)s)){low}"
    " SELECT (SELECT max(id) FROM entries), {crossed}")
_WRITE_PLAIN = _WRITE.format(low="", crossed="false")
_WRITE_LOW = _WRITE.format(low=", {cte}", crossed="EXISTS (SELECT FROM low)")

Started = tuple[Any, list[BalanceChange], list[notify.BalanceNotice]]


def start(session: Session, user_id: str, feature_endpoint_id: str, *, now: datetime,
          hold_ttl_seconds: int, max_output_tokens: int | None, hold: int | None,
          model: str | None, key: str | None, catalog: Catalog, digest: str,
          with_notices: bool = False) -> Started:
    """``service.start`` on PostgreSQL: (result, balance changes, notices).

    With ``with_notices`` the low-balance state is kept in the write statement and the
    notices to publish once committed are returned (with no changes left to stage);
    without, the changes are returned for ``notify.stage`` and no notices.
    """
    from tokenledger.tokenprocess import service as sv

    raw = session.connection().connection.driver_connection
    row = raw.execute(_LOCK_ACCOUNT, (user_id,)).fetchone()
    if row is None:
        raise AccountNotFound(user_id)
    account_id, plan_code, timezone, last_renewal_at, hold_id = row
    account = AccountState(account_id, user_id, plan_code, timezone, as_utc(last_renewal_at))
    account.wallets = [WalletState(w[0], account_id, w[1], w[2], as_utc(w[3]), w[4],
                                   as_utc(w[5]), w[2])
                       for w in raw.execute(_LOCK_WALLETS, (account_id,))]
    available = account.available(now)
    if key is not None:
        stored = raw.execute(_STORED, (key,)).fetchone()
        if stored is not None:
            if stored[0] != digest or not stored[1]:
                raise IdempotencyConflict(key)
            return sv._stored_start(stored[1], available), [], []

    decided = sv.plan_hold(catalog, plan_code, available, now=now, user_id=user_id,
                           feature_endpoint_id=feature_endpoint_id,
                           max_output_tokens=max_output_tokens, hold=hold, model=model,
                           key=key, hold_ttl_seconds=hold_ttl_seconds)
    if isinstance(decided, sv.StartResult):
        return decided, [], []
    amount, hold_key, expires_at = decided.amount, decided.key, decided.expires_at
    chosen, meta = decided.model, decided.metadata
    meta["hold_id"] = hold_id
    # Draw as ``ledger.service.draw`` does; amount <= available, so no overdraft.
    wallet_ids: list[int] = []
    taken: list[int] = []
    before: list[int] = []
    allocations: list[dict[str, Any]] = []
    remaining = amount
    for wallet in draw_order(account, catalog, now, None) if amount else ():
        if remaining == 0:
            break
        take = min(remaining, max(wallet.balance, 0))
        if take:
            wallet_ids.append(wallet.id)
            taken.append(take)
            before.append(wallet.balance)
            wallet.balance -= take
            remaining -= take
            allocations.append({"wallet_id": wallet.id, "wallet_type": wallet.wallet_type,
                                "amount": take})
    assert remaining == 0, (amount, available)
    result = sv.StartResult(sv.ACCESSIBLE, account.available(now), None, hold_id, user_id,
                            feature_endpoint_id, amount, None, expires_at)
    balance = account.balance(now)
    # The outcome row makes the hold key a first-class event key: verify sees its entries
    # as applied, and a retried start with the same key finds its answer there.
    params = {
        "hold_id": hold_id, "key": hold_key, "account_id": account_id, "user_id": user_id,
        "feature": feature_endpoint_id, "model": chosen, "amount": amount,
        "allocations": Jsonb(allocations), "expires_at": expires_at, "now": now,
        "meta": Jsonb(meta), "wallet_ids": wallet_ids, "taken": taken, "before": before,
        "digest": digest, "event": sv.START_EVENT, "result": Jsonb(result.as_dict())}
    sql = _WRITE_PLAIN
    marks = False
    threshold = None
    if with_notices and wallet_ids:
        plan = catalog.plans.get(plan_code)
        threshold = plan.low_balance_threshold if plan else None
        cte, low_params, marks = notify.low_balance_cte(user_id, balance, threshold, now)
        sql = _WRITE_LOW.format(cte=cte)
        params.update(low_params)
    seq, crossed = raw.execute(sql, params).fetchone()
    if seq is None:  # nothing drawn (a free feature): no balance change
        return result, [], []
    if not with_notices:
        return result, [BalanceChange(user_id, balance, seq)], []
    notices = [notify.BalanceNotice(notify.BALANCE_CHANGED, user_id, balance, seq)]
    if marks and crossed:
        notices.append(notify.BalanceNotice(notify.BALANCE_LOW, user_id, balance, seq,
                                            threshold))
    return result, [], notices
