"""The token-process start on PostgreSQL: three reads, a decision, one write, the commit.

The start is the one synchronous write of the ledger, so its latency is the caller's.
The general batch path (``ledger.service._Batch``) spends a round trip per statement and
uses COPY and sequence prefetches that pay off for 1,000 events, not for one. Here:

1. lock the account ``FOR UPDATE``, drawing the hold's id from its sequence in the same
   statement;
2. lock and read its wallets, and with a key the stored outcome, in statements of their
   own, found by ``user_id`` (not by the id statement 1 answers), so all three can be
   sent at once: the server still runs them one after the other, and each later one
   takes its snapshot *after* the account lock was granted, so a start that waited for
   another writer sees that writer's committed wallets, including one it created,
   exactly as the batch path does;
3. :func:`decide` in memory (``service.plan_hold``: plan, estimate; then the draw order);
4. write the hold, its ``HOLD`` entries, the wallets' balances, the outcome row and the
   low-balance state in one statement of data-modifying CTEs (:func:`finish` reads its
   answer), followed by the commit.

The statements are plain text with ``%(name)s`` parameters, so two executors share them:
:func:`start` runs them one by one on a Session's psycopg connection (the SDK's
``run_start``), and the API server sends the reads with ``BEGIN`` and the write with
``COMMIT`` in one round trip each (``tokenledger.api.pgpipe``).

Same rows, same arithmetic, same answers as the portable path in ``service.py`` (which
SQLite uses).
"""

from __future__ import annotations

from dataclasses import dataclass
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

LOCK_ACCOUNT = (
    "SELECT id, plan_code, timezone, last_renewal_at, nextval('holds_id_seq')"
    " FROM accounts WHERE user_id = %(user_id)s FOR UPDATE")
LOCK_WALLETS = (
    "SELECT id, wallet_type, balance, expires_at, is_active, created_at FROM wallets"
    " WHERE account_id = (SELECT id FROM accounts WHERE user_id = %(user_id)s)"
    " ORDER BY id FOR UPDATE")
STORED = "SELECT payload_hash, result FROM event_outcomes WHERE key = %(key)s"
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

Statement = tuple[str, dict[str, Any]]
Started = tuple[Any, list[BalanceChange], list[notify.BalanceNotice]]


def reads(user_id: str, key: str | None) -> list[Statement]:
    """The statements whose rows :func:`decide` takes, in this order, in one transaction."""
    out = [(LOCK_ACCOUNT, {"user_id": user_id}), (LOCK_WALLETS, {"user_id": user_id})]
    if key is not None:
        out.append((STORED, {"key": key}))
    return out


@dataclass(slots=True)
class Decision:
    """What a start does once its reads are in: answer now, or write and then answer.

    With ``write`` set, run it and pass its row to :func:`finish`; otherwise ``result``
    is the answer and nothing needs to be written (the transaction may end either way).
    """

    result: Any
    write: Statement | None = None
    user_id: str = ""
    balance: int = 0
    with_notices: bool = True
    threshold: int | None = None
    marks: bool = False


def decide(rows: list[list[tuple[Any, ...]]], user_id: str, feature_endpoint_id: str, *,
           now: datetime, hold_ttl_seconds: int, max_output_tokens: int | None,
           hold: int | None, model: str | None, key: str | None, catalog: Catalog,
           digest: str, with_notices: bool = True) -> Decision:
    """The start's decision from the rows of :func:`reads` (run under the account lock).

    With ``with_notices`` the write keeps the low-balance state too and :func:`finish`
    answers the notices to publish once committed; without, it answers the balance
    change for ``notify.stage``. Raises AccountNotFound for an unknown user and
    IdempotencyConflict for a key stored with other arguments; a key stored with the same
    ones answers its first result.
    """
    from tokenledger.tokenprocess import service as sv

    if not rows[0]:
        raise AccountNotFound(user_id)
    account_id, plan_code, timezone, last_renewal_at, hold_id = rows[0][0]
    account = AccountState(account_id, user_id, plan_code, timezone, as_utc(last_renewal_at))
    account.wallets = [WalletState(w[0], account_id, w[1], w[2], as_utc(w[3]), w[4],
                                   as_utc(w[5]), w[2])
                       for w in rows[1]]
    available = account.available(now)
    if key is not None and rows[2]:
        stored_hash, stored_result = rows[2][0]
        if stored_hash != digest or not stored_result:
            raise IdempotencyConflict(key)
        return Decision(sv._stored_start(stored_result, available))

    decided = sv.plan_hold(catalog, plan_code, available, now=now, user_id=user_id,
                           feature_endpoint_id=feature_endpoint_id,
                           max_output_tokens=max_output_tokens, hold=hold, model=model,
                           key=key, hold_ttl_seconds=hold_ttl_seconds)
    if isinstance(decided, sv.StartResult):
        return Decision(decided)
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
    # The outcome row makes the hold key a first-class event key: verify sees its entries
    # as applied, and a retried start with the same key finds its answer there.
    params = {
        "hold_id": hold_id, "key": hold_key, "account_id": account_id, "user_id": user_id,
        "feature": feature_endpoint_id, "model": chosen, "amount": amount,
        "allocations": Jsonb(allocations), "expires_at": expires_at, "now": now,
        "meta": Jsonb(meta), "wallet_ids": wallet_ids, "taken": taken, "before": before,
        "digest": digest, "event": sv.START_EVENT, "result": Jsonb(result.as_dict())}
    decision = Decision(result, (_WRITE_PLAIN, params), user_id, account.balance(now),
                        with_notices)
    if with_notices and wallet_ids:
        plan = catalog.plans.get(plan_code)
        decision.threshold = plan.low_balance_threshold if plan else None
        cte, low_params, decision.marks = notify.low_balance_cte(
            user_id, decision.balance, decision.threshold, now)
        decision.write = (_WRITE_LOW.format(cte=cte), {**params, **low_params})
    return decision


def finish(decision: Decision, row: tuple[Any, ...]) -> Started:
    """(result, balance changes, notices) from the write's row: the notices to publish
    once committed, or (without ``with_notices``) the change to stage."""
    seq, crossed = row
    if seq is None:  # nothing drawn (a free feature): no balance change
        return decision.result, [], []
    if not decision.with_notices:
        return decision.result, [BalanceChange(decision.user_id, decision.balance, seq)], []
    notices = [notify.BalanceNotice(notify.BALANCE_CHANGED, decision.user_id,
                                    decision.balance, seq)]
    if decision.marks and crossed:
        notices.append(notify.BalanceNotice(notify.BALANCE_LOW, decision.user_id,
                                            decision.balance, seq, decision.threshold))
    return decision.result, [], notices


def start(session: Session, user_id: str, feature_endpoint_id: str, *, now: datetime,
          hold_ttl_seconds: int, max_output_tokens: int | None, hold: int | None,
          model: str | None, key: str | None, catalog: Catalog, digest: str,
          with_notices: bool = False) -> Started:
    """``service.start`` on PostgreSQL in the Session's transaction, one statement at a
    time: (result, balance changes, notices), as :func:`finish` answers them."""
    raw = session.connection().connection.driver_connection
    rows = [raw.execute(sql, params).fetchall() for sql, params in reads(user_id, key)]
    decision = decide(rows, user_id, feature_endpoint_id, now=now,
                      hold_ttl_seconds=hold_ttl_seconds, max_output_tokens=max_output_tokens,
                      hold=hold, model=model, key=key, catalog=catalog, digest=digest,
                      with_notices=with_notices)
    if decision.write is None:
        return decision.result, [], []
    sql, params = decision.write
    return finish(decision, raw.execute(sql, params).fetchone())
