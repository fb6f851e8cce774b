"""Token-process starts on PostgreSQL: three reads, the decisions, one write, the commit.

The start is the one synchronous write of the ledger, so its latency is the caller's.
The general batch path (``ledger.service._Batch``) spends a round trip per statement and
uses COPY and sequence prefetches that pay off for 1,000 events, not for one. Here the
statements take arrays, so one set of them serves one start (the SDK's ``run_start``) or
a group of starts on distinct accounts (the API server's start pool, which groups the
starts that arrive while its connections are busy: what a start costs PostgreSQL is
mostly per statement, not per row):

1. lock the accounts ``FOR UPDATE`` in id order (as every writer does), drawing each
   hold's id from its sequence in the same statement;
2. lock and read their wallets, and the stored outcomes of the starts' keys, in
   statements of their own, found by ``user_id`` (not by the ids statement 1 answers),
   so all three can be sent at once: the server still runs them one after the other,
   and each later one takes its snapshot *after* the account locks were granted, so a
   start that waited for another writer sees that writer's committed wallets, including
   one it created, exactly as the batch path does;
3. :func:`decide` each start in memory (``service.plan_hold``: plan, estimate; then the
   draw order);
4. :func:`write` the holds, their ``HOLD`` entries, the wallets' balances, the outcome
   rows and the low-balance state in one statement of data-modifying CTEs (:func:`finish`
   reads its answer), followed by the commit.

The statements are plain text with ``%(name)s`` parameters, so two executors share them:
:func:`start` runs them one by one on a Session's psycopg connection, and the API server
sends the reads with ``BEGIN`` and the write with ``COMMIT`` in one round trip each
(``tokenledger.api.pgpipe``).

Same rows, same arithmetic, same answers as the portable path in ``service.py`` (which
SQLite uses).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from tokenledger import notify
from tokenledger.catalog import Catalog
from tokenledger.errors import AccountNotFound, IdempotencyConflict
from tokenledger.ledger.service import BalanceChange
from tokenledger.ledger.wallets import AccountState, WalletState, draw_order
from tokenledger.timeutil import as_utc

LOCK_ACCOUNTS = (
    "SELECT user_id, id, plan_code, timezone, last_renewal_at, nextval('holds_id_seq')"
    " FROM accounts WHERE user_id = ANY(%(user_ids)s::text[]) ORDER BY id FOR UPDATE")
LOCK_WALLETS = (
    "SELECT account_id, id, wallet_type, balance, expires_at, is_active, created_at"
    " FROM wallets WHERE account_id IN"
    " (SELECT id FROM accounts WHERE user_id = ANY(%(user_ids)s::text[]))"
    " ORDER BY id FOR UPDATE")
STORED = ("SELECT key, payload_hash, result FROM event_outcomes"
          " WHERE key = ANY(%(keys)s::text[])")
# The whole write in one statement, for any number of starts on distinct accounts: the
# holds (``h``, one row per start), one HOLD entry per wallet drawn (``d``, with the
# balances before and after, in the order drawn), the wallets' new balances, the outcome
# rows, and the low-balance state (notify's CTEs). The holds come as one JSON document
# and the draws as integer array literals, both built by the json module and str.join in
# C, where a dozen arrays dumped by psycopg element by element cost the API process more
# than the rest of the start. The draws, which find the wallets to update, stay arrays:
# PostgreSQL plans an array of unknown length as ten rows (an index scan of wallets),
# but a JSON recordset as a hundred (a scan of the whole table).
# Answers one row per account with entries (its id and newest entry id: the change's
# ledger_seq) and one per low-balance crossing (its user_id).
WRITE = (
    "WITH h AS (SELECT * FROM json_to_recordset(%(holds)s::json) AS h(id bigint, key text,"
    " account_id bigint, user_id text, feature text, model text, amount bigint,"
    " allocations jsonb, expires_at timestamptz, meta jsonb, digest text, result jsonb)),"
    " d AS (SELECT * FROM unnest(%(draw_accounts)s::bigint[], %(draw_wallets)s::bigint[],"
    " %(draw_taken)s::bigint[], %(draw_before)s::bigint[]) WITH ORDINALITY"
    " AS d(account_id, wallet_id, taken, before, n)),"
    " hold AS (INSERT INTO holds (id, key, account_id, user_id, feature, model, amount,"
    " allocations, status, expires_at, created_at) SELECT id, key, account_id, user_id,"
    " feature, model, amount, allocations, 'open', expires_at, %(now)s FROM h),"
    " entries AS (INSERT INTO ledger_entries (account_id, wallet_id, amount, balance_before,"
    " balance_after, type, feature, event_key, metadata, created_at)"
    " SELECT d.account_id, d.wallet_id, -d.taken, d.before, d.before - d.taken, 'HOLD',"
    " h.feature, h.key, h.meta, %(now)s FROM d JOIN h USING (account_id) ORDER BY d.n"
    " RETURNING id, account_id),"
    " balances AS (UPDATE wallets SET balance = d.before - d.taken FROM d"
    " WHERE wallets.id = d.wallet_id),"
    " outcome AS (INSERT INTO event_outcomes (key, payload_hash, user_id, event_type,"
    " outcome, result, created_at) SELECT key, digest, user_id, %(event)s, 'applied',"
    " result, %(now)s FROM h),"
    " seq AS (SELECT account_id, max(id) AS seq FROM entries GROUP BY account_id), "
    + notify.LOW_BALANCE_CTES +
    " SELECT account_id, seq, NULL::text FROM seq UNION ALL SELECT NULL, NULL, user_id FROM low")
_ENCODER = json.JSONEncoder(separators=(",", ":"))

Statement = tuple[str, dict[str, Any]]
Started = tuple[Any, list[BalanceChange], list[notify.BalanceNotice]]


def reads(user_ids: list[str], keys: list[str]) -> list[Statement]:
    """The statements whose rows :meth:`Locked.of` takes, in this order, in one
    transaction (the stored outcomes only with ``keys``)."""
    out = [(LOCK_ACCOUNTS, {"user_ids": user_ids}), (LOCK_WALLETS, {"user_ids": user_ids})]
    if keys:
        out.append((STORED, {"keys": keys}))
    return out


@dataclass(slots=True)
class Locked:
    """What the reads answered, by user, account and key."""

    accounts: dict[str, tuple[Any, ...]]
    wallets: dict[int, list[tuple[Any, ...]]]
    stored: dict[str, tuple[Any, ...]]

    @classmethod
    def of(cls, rows: list[list[tuple[Any, ...]]]) -> Locked:
        wallets: dict[int, list[tuple[Any, ...]]] = {}
        for w in rows[1]:
            wallets.setdefault(w[0], []).append(w[1:])
        return cls({a[0]: a[1:] for a in rows[0]}, wallets,
                   {o[0]: o[1:] for o in rows[2]} if len(rows) > 2 else {})


@dataclass(slots=True)
class Decision:
    """What a start does once its reads are in: answer now, or hold and then answer.

    With ``hold`` set, it is one of the starts :func:`write` writes and :func:`finish`
    answers; otherwise ``result`` is the answer and nothing needs to be written.
    """

    result: Any
    hold: dict[str, Any] | None = None
    user_id: str = ""
    account_id: int = 0
    balance: int = 0
    with_notices: bool = True
    threshold: int | None = None
    draws: list[tuple[int, int, int]] = field(default_factory=list)


def decide(locked: Locked, user_id: str, feature_endpoint_id: str, *, now: datetime,
           hold_ttl_seconds: int, max_output_tokens: int | None, hold: int | None,
           model: str | None, key: str | None, catalog: Catalog, digest: str,
           with_notices: bool = True) -> Decision:
    """One start's decision from the reads (run under its account's lock).

    With ``with_notices`` the write keeps the low-balance state too and :func:`finish`
    answers the notices to publish once committed; without, it answers the balance
    change for ``notify.stage``. Raises AccountNotFound for an unknown user and
    IdempotencyConflict for a key stored with other arguments; a key stored with the same
    ones answers its first result.
    """
    from tokenledger.tokenprocess import service as sv

    locked_account = locked.accounts.get(user_id)
    if locked_account is None:
        raise AccountNotFound(user_id)
    account_id, plan_code, timezone, last_renewal_at, hold_id = locked_account
    account = AccountState(account_id, user_id, plan_code, timezone, as_utc(last_renewal_at))
    account.wallets = [WalletState(w[0], account_id, w[1], w[2], as_utc(w[3]), w[4],
                                   as_utc(w[5]), w[2])
                       for w in locked.wallets.get(account_id, ())]
    available = account.available(now)
    stored = locked.stored.get(key) if key is not None else None
    if stored is not None:
        stored_hash, stored_result = stored
        if stored_hash != digest or not stored_result:
            raise IdempotencyConflict(key)
        return Decision(sv._stored_start(stored_result, available))

    decided = sv.plan_hold(catalog, plan_code, available, now=now, user_id=user_id,
                           feature_endpoint_id=feature_endpoint_id,
                           max_output_tokens=max_output_tokens, hold=hold, model=model,
                           key=key, hold_ttl_seconds=hold_ttl_seconds)
    if isinstance(decided, sv.StartResult):
        return Decision(decided)
    amount, meta = decided.amount, decided.metadata
    meta["hold_id"] = hold_id
    # Draw as ``ledger.service.draw`` does; amount <= available, so no overdraft.
    draws: list[tuple[int, int, int]] = []  # (wallet id, taken, balance before)
    allocations: list[dict[str, Any]] = []
    remaining = amount
    for wallet in draw_order(account, catalog, now, None) if amount else ():
        if remaining == 0:
            break
        take = min(remaining, max(wallet.balance, 0))
        if take:
            draws.append((wallet.id, take, wallet.balance))
            wallet.balance -= take
            remaining -= take
            allocations.append({"wallet_id": wallet.id, "wallet_type": wallet.wallet_type,
                                "amount": take})
    assert remaining == 0, (amount, available)
    result = sv.StartResult(sv.ACCESSIBLE, account.available(now), None, hold_id, user_id,
                            feature_endpoint_id, amount, None, decided.expires_at)
    # The outcome row makes the hold key a first-class event key: verify sees its entries
    # as applied, and a retried start with the same key finds its answer there.
    row = {"id": hold_id, "key": decided.key, "account_id": account_id, "user_id": user_id,
           "feature": feature_endpoint_id, "model": decided.model, "amount": amount,
           "allocations": allocations, "expires_at": decided.expires_at.isoformat(),
           "meta": meta, "digest": digest, "result": result.as_dict()}
    plan = catalog.plans.get(plan_code)
    return Decision(result, row, user_id, account_id, account.balance(now), with_notices,
                    plan.low_balance_threshold if plan else None, draws)


def write(decisions: list[Decision], now: datetime) -> Statement | None:
    """The one statement writing the holds of ``decisions`` (on distinct accounts; those
    without a hold are skipped), or None when none holds."""
    from tokenledger.tokenprocess.service import START_EVENT

    holding = [d for d in decisions if d.hold is not None]
    if not holding:
        return None
    if len({d.account_id for d in holding}) < len(holding):
        # Each decision drew from its account's balance as read: two on one account would
        # both have drawn from the same balance (the statement also pairs entries with
        # holds by account).
        raise ValueError("one write holds at most once per account")
    drawn = [(d.account_id, *draw) for d in holding for draw in d.draws]
    accounts, wallets, taken, before = zip(*drawn, strict=True) if drawn else ((),) * 4
    params: dict[str, Any] = {
        "holds": _ENCODER.encode([d.hold for d in holding]), "now": now,
        "event": START_EVENT, "draw_accounts": _int_array(accounts),
        "draw_wallets": _int_array(wallets), "draw_taken": _int_array(taken),
        "draw_before": _int_array(before)}
    params.update(notify.low_balance_params(
        [(d.user_id, d.account_id, d.balance, d.threshold)
         for d in holding if d.with_notices and d.draws], now))
    return WRITE, params


def _int_array(values: tuple[int, ...]) -> str:
    """A PostgreSQL array literal of integers (nothing to quote)."""
    return "{" + ",".join(map(str, values)) + "}"


def finish(decisions: list[Decision], rows: list[tuple[Any, ...]]) -> list[Started]:
    """(result, balance changes, notices) of each decision, given the rows :func:`write`'s
    statement answered (none when it was not needed): the notices to publish once
    committed, or (without ``with_notices``) the change to stage."""
    seqs = {row[0]: row[1] for row in rows if row[0] is not None}
    crossed = {row[2] for row in rows if row[2] is not None}
    out: list[Started] = []
    for d in decisions:
        seq = seqs.get(d.account_id) if d.hold is not None else None
        if seq is None:  # nothing written, or nothing drawn (a free feature)
            out.append((d.result, [], []))
        elif not d.with_notices:
            out.append((d.result, [BalanceChange(d.user_id, d.balance, seq)], []))
        else:
            notices = [notify.BalanceNotice(notify.BALANCE_CHANGED, d.user_id, d.balance, seq)]
            if d.user_id in crossed:
                notices.append(notify.BalanceNotice(notify.BALANCE_LOW, d.user_id, d.balance,
                                                    seq, d.threshold))
            out.append((d.result, [], notices))
    return out


def start(session: Session, user_id: str, feature_endpoint_id: str, *, now: datetime,
          hold_ttl_seconds: int, max_output_tokens: int | None, hold: int | None,
          model: str | None, key: str | None, catalog: Catalog, digest: str,
          with_notices: bool = False) -> Started:
    """``service.start`` on PostgreSQL in the Session's transaction, one statement at a
    time: (result, balance changes, notices), as :func:`finish` answers them."""
    raw = session.connection().connection.driver_connection
    rows = [raw.execute(sql, params).fetchall()
            for sql, params in reads([user_id], [key] if key is not None else [])]
    decision = decide(Locked.of(rows), user_id, feature_endpoint_id, now=now,
                      hold_ttl_seconds=hold_ttl_seconds, max_output_tokens=max_output_tokens,
                      hold=hold, model=model, key=key, catalog=catalog, digest=digest,
                      with_notices=with_notices)
    statement = write([decision], now)
    written = raw.execute(*statement).fetchall() if statement is not None else []
    return finish([decision], written)[0]
