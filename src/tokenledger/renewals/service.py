"""Daily resets, monthly renewals and wallet expiry, planned in keyset chunks and applied
set-based. Nothing here commits: callers (a Celery task, the CLI) own the transaction.

How a run works, and why:
1. ``plan_run`` fixes the run's instant (``as_of``) and cuts the due accounts into keyset
   chunks ``(after_id, upto_id]`` by account id. Every chunk judges "due" against the same
   instant, so a run is one consistent cut however long its chunks take.
2. ``process_chunk`` is one short transaction: it locks the chunk row (a redelivered chunk
   waits, then sees ``done`` and changes nothing), locks the chunk's due accounts
   ``FOR UPDATE`` in id order like every other writer, and then applies every grant.
   On PostgreSQL that is one data-modifying statement deciding and writing the whole
   chunk on the server (``_pg_sql``); on SQLite (the demo) the same rules run in Python
   (``_decide``) with one statement per table.
3. The grant's ledger entry is keyed per account and period (``reset:<account_id>:
   <local-date>``, ``renewal:<account_id>:<period-start>``) and the entry's unique
   (event_key, wallet_id, type) makes it the once-per-period record; the account's period
   mark (``last_reset_on``/``last_renewal_at``), written in the same transaction and
   checked under the lock, keeps a re-run, a second beat or a redelivered chunk from even
   trying. System grants have no ``event_outcomes`` row: they are not client events.
4. The chunk adds its counts to the run row last (the lock on it is held only until commit);
   the chunk that finishes the run seals it.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from sqlalchemy import (
    ColumnElement,
    Row,
    and_,
    bindparam,
    case,
    false,
    func,
    null,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import TextClause

from tokenledger import notify
from tokenledger.catalog import Catalog, PlanSpec
from tokenledger.errors import AccountNotFound, TokenLedgerError, ValidationFailed
from tokenledger.ledger.service import BalanceChange
from tokenledger.models import STANDARD, Account, EventOutcome, LedgerEntry, Wallet
from tokenledger.renewals.models import RUN_KINDS, RenewalChunk, RenewalRun
from tokenledger.timeutil import as_utc, next_local_midnight, utcnow

accounts_t = Account.__table__
wallets_t = Wallet.__table__
entries_t = LedgerEntry.__table__
outcomes_t = EventOutcome.__table__
runs_t = RenewalRun.__table__
chunks_t = RenewalChunk.__table__

PERIOD_30D = timedelta(days=30)
ENTRY_TYPE = {"daily": "DAILY_RESET", "monthly": "RENEWAL"}
KEY_PREFIX = {"daily": "reset", "monthly": "renewal"}
PLAN_PERIOD = {"daily": "daily", "monthly": "30d"}
MAX_CHUNK = 50_000
RUN_ERRORS_KEPT = 1000


class RunNotFound(TokenLedgerError):
    """A renewal run id that does not exist."""

    def __init__(self, run_id: int) -> None:
        super().__init__(f"renewal run not found: {run_id}")
        self.run_id = run_id


@dataclass(frozen=True, slots=True)
class RunOptions:
    """What a batch run covers and how it behaves on errors."""

    kind: str
    tier: str | None = None
    limit: int | None = None
    dry_run: bool = False
    continue_on_error: bool = True
    chunk_size: int = 2000
    trigger: str = "cli"

    def __post_init__(self) -> None:
        if self.kind not in RUN_KINDS:
            raise ValidationFailed(f"kind: must be one of {', '.join(RUN_KINDS)}")
        if self.limit is not None and self.limit < 1:
            raise ValidationFailed("limit: must be at least 1")
        if not 1 <= self.chunk_size <= MAX_CHUNK:
            raise ValidationFailed(f"chunk_size: must be between 1 and {MAX_CHUNK}")


@dataclass(slots=True)
class Grant:
    """One account's grant for one period (amount 0 when already at its target)."""

    account_id: int
    user_id: str
    wallet_id: int
    plan: str
    period: str
    key: str
    before: int
    after: int
    mark: Any  # the new last_reset_on (date string) or last_renewal_at (datetime)

    @property
    def amount(self) -> int:
        return self.after - self.before

    def change(self) -> dict[str, Any]:
        return {"user_id": self.user_id, "account_id": self.account_id, "plan": self.plan,
                "period": self.period, "key": self.key, "wallet_id": self.wallet_id,
                "balance_before": self.before, "balance_after": self.after,
                "amount": self.amount}


@dataclass(slots=True)
class ChunkResult:
    """What one chunk did; ``finished`` is true for the chunk that sealed its run."""

    run_id: int
    chunk_id: int
    status: str
    processed: int = 0
    successful: int = 0
    failed: int = 0
    skipped: int = 0
    tokens: int = 0
    finished: bool = False
    already_done: bool = False
    more: bool = False  # a slice committed; the chunk's next slice is still to do
    errors: list[dict[str, Any]] = field(default_factory=list)
    # This slice's balance changes (one per granted account), for notify.stage_bulk.
    balance_changes: notify.BulkChanges | None = None


# -- what is due ---------------------------------------------------------------------------


def renewing_plans(catalog: Catalog, kind: str, tier: str | None = None) -> list[str]:
    """The plan codes a run of ``kind`` covers (only ``tier`` when given)."""
    period = PLAN_PERIOD[kind]
    if tier is not None:
        plan = catalog.plans.get(tier)
        if plan is None:
            raise ValidationFailed(f"tier: unknown plan {tier!r}")
        if plan.period != period:
            raise ValidationFailed(f"tier: plan {tier!r} renews {plan.period}, "
                                   f"not in a {kind} run")
        return [tier]
    return sorted(code for code, plan in catalog.plans.items() if plan.period == period)


@lru_cache(maxsize=16)
def _local_dates(as_of: datetime) -> dict[str, str]:
    """Every known IANA zone's calendar date at ``as_of`` (zoneinfo: DST-safe)."""
    dates: dict[str, str] = {}
    for name in available_timezones():
        try:
            dates[name] = as_of.astimezone(ZoneInfo(name)).date().isoformat()
        except (ZoneInfoNotFoundError, ValueError, OSError):
            continue
    return dates


def _local_date(as_of: datetime, tz: str) -> str | None:
    known = _local_dates(as_of).get(tz)
    if known is not None:
        return known
    try:
        return as_of.astimezone(ZoneInfo(tz)).date().isoformat()
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return None


def due_clause(kind: str, as_of: datetime, plan_codes: Sequence[str]) -> ColumnElement[bool]:
    """SQL for "this account's period has turned at ``as_of``" (both dialects).

    Daily: the zones are grouped by their local date at ``as_of`` (at most three dates
    exist at any instant), so each account is compared with its own local day without
    the database knowing time zones. Accounts with a zone we cannot resolve are selected
    too, so they fail loudly instead of silently never resetting.
    """
    if not plan_codes:
        return false()
    a = accounts_t.c
    in_plans = a.plan_code.in_(list(plan_codes))
    if kind == "monthly":
        anchor = func.coalesce(a.last_renewal_at, a.created_at)
        return and_(in_plans, anchor <= as_of - PERIOD_30D)
    dates = _local_dates(as_of)
    by_date: dict[str, list[str]] = defaultdict(list)
    for tz, day in dates.items():
        by_date[day].append(tz)
    turned = [and_(a.timezone.in_(sorted(tzs)),
                   or_(a.last_reset_on.is_(None), a.last_reset_on < day))
              for day, tzs in sorted(by_date.items())]
    return and_(in_plans, or_(*turned, a.timezone.not_in(sorted(dates))))


def _target(plan: PlanSpec, balance: int) -> int:
    """The STANDARD wallet's balance after a grant: reset to the allocation, or top up
    (never beyond the rollover cap, and never taking anything away)."""
    if plan.renewal_mode == "reset":
        return plan.allocation
    after = balance + plan.allocation
    if plan.rollover_cap is not None:
        after = min(after, max(plan.rollover_cap, balance))
    return after


def _decide(row: _Candidate, kind: str, plan: PlanSpec | None, as_of: datetime
            ) -> Grant | str | None:
    """A grant, an error message, or None when the account is not due (any more)."""
    if plan is None:
        return f"plan {row.plan_code!r} is not in the catalog"
    if kind == "daily":
        day = _local_date(as_of, row.timezone)
        if day is None:
            return f"unknown timezone {row.timezone!r}"
        if row.last_reset_on is not None and row.last_reset_on >= day:
            return None
        period, mark = day, day
    else:
        anchor = as_utc(row.last_renewal_at or row.created_at)
        assert anchor is not None
        elapsed = as_of - anchor
        if elapsed < PERIOD_30D:
            return None
        # Keep the account's anchor: the new period starts a whole number of periods
        # after the old one, so renewals do not drift later with each run, and an
        # account missed for months is caught up once, not once per missed period.
        mark = anchor + PERIOD_30D * (elapsed // PERIOD_30D)
        period = mark.date().isoformat()
    if row.wallet_id is None:
        return "account has no STANDARD wallet"
    if not row.is_active:
        return "STANDARD wallet is inactive"
    return Grant(row.id, row.user_id, row.wallet_id, row.plan_code, period,
                 f"{KEY_PREFIX[kind]}:{row.id}:{period}", row.balance,
                 _target(plan, row.balance), mark)


@dataclass(slots=True)
class _Candidate:
    id: int
    user_id: str
    plan_code: str
    timezone: str
    last_renewal_at: datetime | None
    last_reset_on: str | None
    created_at: datetime
    wallet_id: int | None = None
    balance: int = 0
    is_active: bool = False


def _candidates(session: Session, kind: str, as_of: datetime, plan_codes: Sequence[str],
                after_id: int, upto_id: int, lock: bool) -> list[_Candidate]:
    a, w = accounts_t.c, wallets_t.c
    stmt = (
        select(a.id, a.user_id, a.plan_code, a.timezone, a.last_renewal_at, a.last_reset_on,
               a.created_at)
        .where(a.id > after_id, a.id <= upto_id, due_clause(kind, as_of, plan_codes))
        .order_by(a.id)
    )
    if lock:
        # The account row is every writer's serialization point; id order rules out
        # deadlocks with live batches, which lock their accounts in the same order.
        stmt = stmt.with_for_update()
    found = {r.id: _Candidate(*r) for r in session.execute(stmt)}
    if not found:
        return []
    # Wallets are read by a second statement, after the locks are held: under READ
    # COMMITTED it sees every charge that committed while we waited. (A join in the
    # locking statement would re-check only the locked rows and could read a stale
    # balance.)
    for r in session.execute(
        select(w.account_id, w.id, w.balance, w.is_active)
        .where(w.account_id > after_id, w.account_id <= upto_id, w.wallet_type == STANDARD,
               w.expires_at.is_(None))
    ):
        c = found.get(r.account_id)
        if c is not None:
            c.wallet_id, c.balance, c.is_active = r.id, r.balance, r.is_active
    return list(found.values())


def _is_pg(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def _existing_outcomes(session: Session, keys: list[str]) -> dict[str, str]:
    if not keys:
        return {}
    if _is_pg(session):
        rows = session.execute(text(
            "SELECT key, event_type FROM event_outcomes WHERE key = ANY(:keys)"),
            {"keys": keys})
    else:
        rows = session.execute(select(outcomes_t.c.key, outcomes_t.c.event_type)
                               .where(outcomes_t.c.key.in_(keys)))
    return {r.key: r.event_type for r in rows}


def _granted_keys(session: Session, kind: str, grants: list[Grant]) -> set[str]:
    """The grants' keys that already have their entry (a period granted before)."""
    keys = [g.key for g in grants if g.amount != 0]
    if not keys:
        return set()
    e = entries_t.c
    return set(session.scalars(select(e.event_key).where(
        e.event_key.in_(keys), e.type == ENTRY_TYPE[kind])))


# -- writing -------------------------------------------------------------------------------


def _write_portable(session: Session, kind: str, run_id: int, grants: list[Grant],
                    now: datetime) -> None:
    """Wallets, entries and period marks, one executemany each (SQLite, the demo path)."""
    movers = [g for g in grants if g.amount != 0]
    if movers:
        session.execute(
            update(wallets_t).where(wallets_t.c.id == bindparam("_id"))
            .values(balance=bindparam("_balance")),
            [{"_id": g.wallet_id, "_balance": g.after} for g in movers],
            execution_options={"synchronize_session": False})
        session.execute(entries_t.insert(), [{
            "account_id": g.account_id, "wallet_id": g.wallet_id, "amount": g.amount,
            "balance_before": g.before, "balance_after": g.after, "type": ENTRY_TYPE[kind],
            "event_key": g.key, "metadata": {"run": run_id, "plan": g.plan},
            "created_at": now} for g in movers])
    if grants:
        column = "last_reset_on" if kind == "daily" else "last_renewal_at"
        session.execute(
            update(accounts_t).where(accounts_t.c.id == bindparam("_id"))
            .values({column: bindparam("_mark")}),
            [{"_id": g.account_id, "_mark": g.mark} for g in grants],
            execution_options={"synchronize_session": False})


def _balance_changes(session: Session, entry_type: str,
                     written: list[tuple[str, int, str]]) -> list[BalanceChange]:
    """After entries of ``entry_type`` were written, as (user_id, account_id, event_key):
    each account's live balance and its newest such entry (the change's ledger_seq)."""
    if not written:
        return []
    e, w = entries_t.c, wallets_t.c
    seqs = dict(session.execute(select(e.event_key, e.id).where(
        e.event_key.in_([key for _, _, key in written]), e.type == entry_type)).all())
    now = utcnow()
    balances = dict(session.execute(
        select(w.account_id, func.sum(w.balance))
        .where(w.account_id.in_({account_id for _, account_id, _ in written}), w.is_active,
               or_(w.expires_at.is_(None), w.expires_at > now))
        .group_by(w.account_id)).all())
    latest: dict[int, BalanceChange] = {}
    for user_id, account_id, key in written:
        seq = seqs[key]
        if account_id not in latest or seq > latest[account_id].ledger_seq:
            latest[account_id] = BalanceChange(user_id, int(balances.get(account_id) or 0), seq)
    return list(latest.values())


# -- the PostgreSQL chunk: server-side and set-based -----------------------------------------
#
# A chunk is two statements whatever its size: one locks its due accounts in id order,
# one data-modifying CTE decides every grant and writes it. No row travels to Python and
# no parameter is per row: the plans (and, for daily runs, each zone's local date) go in
# as a few small arrays. The decision is the same as ``_decide``/``_target``; the tests
# run both this path and the portable one.

# Each plan's entry metadata is built once per statement, not once per row.
_PLANS = ("p(code, allocation, mode, cap, low, meta) AS (SELECT v.*, jsonb_build_object("
          "'run', CAST(:run AS bigint), 'plan', v.code) FROM unnest("
          "CAST(:codes AS text[]), CAST(:allocs AS bigint[]), CAST(:modes AS text[]),"
          " CAST(:caps AS bigint[]), CAST(:lows AS bigint[])) AS v(code, allocation, mode, cap,"
          " low))")
_ZONES = ("LEFT JOIN unnest(CAST(:zones AS text[]), CAST(:days AS text[])) AS z(tz, day)"
          " ON z.tz = a.timezone")
_DUE = {
    "monthly": "coalesce(a.last_renewal_at, a.created_at) <= :cut",
    # An unknown zone is selected too, so it fails loudly instead of never resetting.
    "daily": "(z.day IS NULL OR a.last_reset_on IS NULL OR a.last_reset_on < z.day)",
}
_STD = "x.wallet_type = 'STANDARD' AND x.expires_at IS NULL"
_RANGE = "a.id > :after AND a.id <= :upto AND a.plan_code = ANY(CAST(:codes AS text[]))"
# Monthly: keep the account's anchor. The new period starts a whole number of 30-day
# periods after the old one (seconds, not calendar days: DST-proof), so renewals do not
# drift later with each run and an account missed for months is caught up once.
_ELAPSED = ("CAST(floor((extract(epoch FROM CAST(:as_of AS timestamptz))"
            " - extract(epoch FROM coalesce(a.last_renewal_at, a.created_at))) / 2592000)"
            " AS bigint)")
_MARK = {
    "monthly": ("coalesce(a.last_renewal_at, a.created_at)"
                f" + {_ELAPSED} * interval '2592000 seconds'"),
    "daily": "z.day",
}
_PERIOD = {"monthly": "to_char(c.mark AT TIME ZONE 'UTC', 'YYYY-MM-DD')", "daily": "c.mark"}
_MARK_COLUMN = {"monthly": "last_renewal_at", "daily": "last_reset_on"}
_MESSAGE = notify.message_sql("user_id", "balance", "seq")


@lru_cache(maxsize=8)
def _pg_text(kind: str, dry_run: bool, skip_granted: bool = False) -> tuple[TextClause, TextClause]:
    """:func:`_pg_sql` as statements, built once (a slice's text is ~5 kB to parse)."""
    lock, decide = _pg_sql(kind, dry_run, skip_granted)
    return text(lock), text(decide)


_CUSTOM_PLANS = text("SET LOCAL plan_cache_mode = force_custom_plan")


def _pg_sql(kind: str, dry_run: bool, skip_granted: bool = False) -> tuple[str, str]:
    """The lock statement and the decide-and-write statement for a chunk of ``kind``
    (``skip_granted``: look for periods granted before and skip them, at some cost per
    row)."""
    zones = _ZONES if kind == "daily" else ""
    where = f"WHERE {_RANGE} AND {_DUE[kind]}"
    lock = (f"SELECT count(*) FROM (SELECT a.id FROM accounts AS a {zones} {where}"
            " ORDER BY a.id FOR UPDATE OF a) AS locked")
    zone_error = ("WHEN z.day IS NULL THEN 'unknown timezone ' || quote_literal(a.timezone)"
                  if kind == "daily" else "")
    key = "CAST(:prefix AS text) || ':' || g.account_id || ':' || g.period"
    decide = (
        f"WITH {_PLANS},"
        # The wallets are read by this second statement, after the first one holds the
        # locks: under READ COMMITTED its snapshot has every charge that committed while
        # we waited. (Read in the locking statement they could be stale.)
        " c AS (SELECT a.id AS account_id, a.user_id, a.plan_code,"
        f"  {_MARK[kind]} AS mark, w.id AS wallet_id, w.balance AS before, w.live,"
        "  p.allocation, p.mode, p.cap, p.low, CASE"
        f"  {zone_error}"
        "   WHEN w.id IS NULL THEN 'account has no STANDARD wallet'"
        "   WHEN NOT w.is_active THEN 'STANDARD wallet is inactive' END AS error"
        f"  FROM accounts AS a {zones} JOIN p ON p.code = a.plan_code"
        # One pass over the range's wallets: each account's STANDARD wallet, and the sum
        # of its live wallets (for its balance_changed notice).
        f"  LEFT JOIN (SELECT x.account_id, max(x.id) FILTER (WHERE {_STD}) AS id,"
        f"   max(x.balance) FILTER (WHERE {_STD}) AS balance,"
        f"   bool_or(x.is_active) FILTER (WHERE {_STD}) AS is_active,"
        "   CAST(coalesce(sum(x.balance) FILTER (WHERE x.is_active"
        "    AND (x.expires_at IS NULL OR x.expires_at > now())), 0) AS bigint) AS live"
        "   FROM wallets AS x WHERE x.account_id > :after AND x.account_id <= :upto"
        "   GROUP BY x.account_id) AS w ON w.account_id = a.id"
        f"  {where}),"
        " s AS (SELECT min(account_id) AS first FROM c WHERE error IS NOT NULL),"
        " g AS (SELECT c.account_id, c.user_id, c.plan_code, c.wallet_id, c.mark,"
        "  c.low, c.live,"
        f"  {_PERIOD[kind]} AS period, c.before, CASE WHEN c.mode = 'reset' THEN c.allocation"
        "   WHEN c.cap IS NULL THEN c.before + c.allocation"
        "   ELSE least(c.before + c.allocation, greatest(c.cap, c.before)) END AS after"
        "  FROM c, s WHERE c.error IS NULL"
        "   AND (NOT :stop OR s.first IS NULL OR c.account_id < s.first)),"
    )
    errors = ("(SELECT coalesce(json_agg(json_build_object('user_id', c.user_id,"
              " 'account_id', c.account_id, 'error', c.error) ORDER BY c.account_id), '[]')"
              " FROM c, s WHERE c.error IS NOT NULL AND (NOT :stop OR c.account_id = s.first))"
              " AS errors")
    if dry_run:
        # Nothing written: report what would be, and which periods were granted before.
        return lock, decide + (
            f" d AS (SELECT g.*, {key} AS key, EXISTS (SELECT 1 FROM ledger_entries AS e"
            f"  WHERE e.event_key = {key} AND e.wallet_id = g.wallet_id AND e.type = :type)"
            "  AS granted FROM g)"
            " SELECT (SELECT count(*) FROM g) AS grants,"
            " (SELECT count(*) FROM d WHERE granted AND after <> before) AS already,"
            " (SELECT coalesce(sum(after - before), 0) FROM d WHERE NOT granted) AS tokens,"
            " (SELECT coalesce(json_agg(json_build_object('user_id', user_id,"
            "  'account_id', account_id, 'plan', plan_code, 'period', period, 'key', key,"
            "  'wallet_id', wallet_id, 'balance_before', before, 'balance_after', after,"
            "  'amount', after - before) ORDER BY account_id), '[]')"
            "  FROM d WHERE NOT granted AND after <> before) AS changes,"
            f" {errors}")
    # A period granted before (its account's mark set back by hand) already has its entry:
    # only the redo after a unique violation looks for those, one index probe per grant.
    granted = (f"EXISTS (SELECT FROM ledger_entries AS e WHERE e.event_key = {key}"
               " AND e.wallet_id = g.wallet_id AND e.type = :type)" if skip_granted else "false")
    return lock, decide + (
        # The entry's unique (event_key, wallet_id, type) is the once-per-period record.
        # Each new entry's id is drawn here, so that the writes and the notices below all
        # read this one CTE: a join of two CTEs (the insert's RETURNING with the grants) is
        # planned on a guess of a few rows each, and was sometimes a nested loop over both
        # (quadratic in the slice).
        f" t AS (SELECT g.*, {key} AS key, {granted} AS granted, CASE WHEN g.after <> g.before"
        f"  AND NOT {granted} THEN nextval('ledger_entries_id_seq') END AS entry_id"
        "  FROM g ORDER BY g.account_id),"  # ids in account order (drawn after the sort)
        " ins AS (INSERT INTO ledger_entries (id, account_id, wallet_id, amount,"
        "  balance_before, balance_after, type, event_key, metadata, created_at)"
        "  SELECT t.entry_id, t.account_id, t.wallet_id, t.after - t.before, t.before, t.after,"
        # The plan's metadata joins here, not in c: carried through c, g and t (three
        # materialized CTEs) it cost ~2 us of the database's CPU per account.
        "   :type, t.key, p.meta, :now FROM t JOIN p ON p.code = t.plan_code"
        "  WHERE t.entry_id IS NOT NULL"
        "  ORDER BY t.account_id RETURNING amount),"
        " w AS (UPDATE wallets SET balance = t.after FROM t"
        "  WHERE wallets.id = t.wallet_id AND t.entry_id IS NOT NULL RETURNING 1),"
        f" m AS (UPDATE accounts SET {_MARK_COLUMN[kind]} = t.mark FROM t"
        "  WHERE accounts.id = t.account_id RETURNING 1),"
        # Each granted account's balance_changed: its live wallets as this statement's
        # snapshot sees them (it cannot see its own wallet update) plus the grant. An
        # account is "concerned" when its low-balance state may change (marked low, or at
        # or below its plan's threshold): only those need notify.stage_bulk's attention.
        # (MATERIALIZED: the EXISTS runs once per row, not once per use below.)
        " n AS MATERIALIZED (SELECT t.user_id, t.entry_id AS seq,"
        "  t.live + t.after - t.before AS balance, (t.live + t.after - t.before <= t.low"
        "  OR EXISTS (SELECT FROM low_balance_state AS l WHERE l.user_id = t.user_id))"
        "  AS concerned FROM t WHERE t.entry_id IS NOT NULL)"
        " SELECT (SELECT count(*) FROM t) AS grants,"
        " (SELECT count(*) FROM t WHERE granted AND after <> before) AS already,"
        " (SELECT coalesce(sum(amount), 0) FROM ins) AS tokens,"
        " (SELECT count(*) FROM ins) AS inserted, (SELECT count(*) FROM w) AS wallets,"
        " (SELECT count(*) FROM m) AS marked, nn.messages,"
        " nn.low_users, nn.low_balances, nn.low_seqs,"
        f" {errors} FROM (SELECT string_agg({_MESSAGE}, E'\\n') AS messages,"
        "  array_agg(user_id) FILTER (WHERE concerned) AS low_users,"
        "  array_agg(balance) FILTER (WHERE concerned) AS low_balances,"
        "  array_agg(seq) FILTER (WHERE concerned) AS low_seqs FROM n) AS nn")


def _pg_params(kind: str, run: Row[Any], after: int, upto: int, catalog: Catalog,
               codes: Sequence[str], as_of: datetime) -> dict[str, Any]:
    plans = [catalog.plans[code] for code in codes]
    params: dict[str, Any] = {
        "after": after, "upto": upto, "codes": list(codes),
        "allocs": [p.allocation for p in plans], "modes": [p.renewal_mode for p in plans],
        "caps": [p.rollover_cap for p in plans],
        "lows": [p.low_balance_threshold for p in plans], "as_of": as_of,
        "stop": not run.continue_on_error, "prefix": KEY_PREFIX[kind],
        "type": ENTRY_TYPE[kind], "run": run.id, "now": as_of}
    if kind == "monthly":
        params["cut"] = as_of - PERIOD_30D
    else:
        dates = _local_dates(as_of)
        params["zones"], params["days"] = list(dates), list(dates.values())
    return params


def _process_pg(session: Session, run: Row[Any], after: int, upto: int, catalog: Catalog,
                codes: Sequence[str], as_of: datetime, result: ChunkResult
                ) -> list[dict[str, Any]] | None:
    """Decide and write accounts ``(after, upto]`` on the server; fills ``result``,
    returns the dry-run changes."""
    if not codes:
        return [] if run.dry_run else None
    lock, decide = _pg_text(run.kind, run.dry_run)
    params = _pg_params(run.kind, run, after, upto, catalog, codes, as_of)
    # Plan each slice for its own range: once psycopg prepares the statement, a generic
    # plan guesses one row per CTE and joins them by nested loops (quadratic in the slice).
    session.execute(_CUSTOM_PLANS)
    if run.dry_run:
        row = session.execute(decide, params).one()
    else:
        # The account row is every writer's serialization point; id order rules out
        # deadlocks with live batches, which lock their accounts in the same order.
        session.execute(lock, params)
        try:
            with session.begin_nested():
                row = session.execute(decide, params).one()
        except IntegrityError:
            # Under the locks, a grant key can only exist already if an account's period
            # mark was set back by hand: redo the slice, skipping the granted periods.
            # (Looking for them costs an index probe per row, so only here.)
            row = session.execute(_pg_text(run.kind, False, skip_granted=True)[1],
                                  params).one()
    if not run.dry_run and (row.wallets != row.inserted or row.marked != row.grants):
        # Cannot happen while every STANDARD wallet is unique per account; never commit it.
        raise RuntimeError(f"renewal of accounts {after + 1}..{upto}: {row.inserted} entries but "
                           f"{row.wallets} wallets, {row.grants} grants but {row.marked} marks")
    result.errors = list(row.errors)
    if not run.dry_run and row.messages:
        concerned = [notify.BalanceNotice(notify.BALANCE_CHANGED, user, balance, seq)
                     for user, balance, seq in zip(row.low_users or [], row.low_balances or [],
                                                   row.low_seqs or [], strict=True)]
        result.balance_changes = notify.BulkChanges(row.messages, concerned)
    result.successful = row.grants - row.already
    result.skipped += row.already
    result.failed = len(result.errors)
    result.processed = result.successful + result.failed
    result.tokens = int(row.tokens)
    return list(row.changes) if run.dry_run else None


# -- runs ----------------------------------------------------------------------------------


def plan_run(session: Session, options: RunOptions, catalog: Catalog,
             now: datetime) -> RenewalRun:
    """Record a run and cut its due accounts into keyset chunks (in the caller's
    transaction). A run with nothing due is completed at once."""
    as_of = as_utc(now)
    assert as_of is not None
    codes = renewing_plans(catalog, options.kind, options.tier)
    run = RenewalRun(
        kind=options.kind, status="running", trigger=options.trigger, tier=options.tier,
        account_limit=options.limit, dry_run=options.dry_run,
        continue_on_error=options.continue_on_error, as_of=as_of,
        chunk_size=options.chunk_size, candidates=0, total_chunks=0, chunks_done=0,
        total_processed=0, successful=0, failed=0, skipped=0, tokens_granted=0,
        alert=False, created_at=as_of)
    session.add(run)
    session.flush()

    due = due_clause(options.kind, as_of, codes)
    a = accounts_t.c
    chunks: list[dict[str, Any]] = []
    after, remaining = 0, options.limit
    while remaining is None or remaining > 0:
        size = options.chunk_size if remaining is None else min(options.chunk_size, remaining)
        # Keyset pagination: the id of the size-th due account after the previous chunk.
        upto = session.scalar(select(a.id).where(due, a.id > after).order_by(a.id)
                              .offset(size - 1).limit(1))
        count = size
        if upto is None:
            tail = session.scalars(select(a.id).where(due, a.id > after).order_by(a.id)
                                   .limit(size)).all()
            if not tail:
                break
            upto, count = tail[-1], len(tail)
        chunks.append({"run_id": run.id, "seq": len(chunks) + 1, "after_id": after,
                       "upto_id": upto, "planned": count, "status": "pending", "processed": 0,
                       "successful": 0, "failed": 0, "skipped": 0, "tokens": 0})
        after = upto
        if remaining is not None:
            remaining -= count
        if count < size:
            break
    if chunks:
        session.execute(chunks_t.insert(), chunks)
    run.total_chunks = len(chunks)
    run.candidates = sum(c["planned"] for c in chunks)
    if not chunks:
        run.status = "completed"
        run.finished_at = as_of
        run.errors = []
    session.flush()
    return run


def pending_chunks(session: Session, run_id: int) -> list[int]:
    """Ids of the run's chunks not processed yet, in account order."""
    return list(session.scalars(
        select(chunks_t.c.id).where(chunks_t.c.run_id == run_id,
                                    chunks_t.c.status == "pending")
        .order_by(chunks_t.c.seq)))


def process_chunk(session: Session, chunk_id: int, catalog: Catalog,
                  slice_size: int | None = None) -> ChunkResult:
    """Apply one chunk of a run, or only its next ``slice_size`` accounts (``more`` is then
    set until the last slice). Safe to run twice: a processed chunk changes nothing.

    Slices keep each transaction, and so each account lock a live charge may wait for,
    short, while a worker still takes a large chunk per task. A slice commits its grants
    and its counts on the chunk row together, then moves the chunk's ``after_id`` past
    itself: a chunk redelivered after a crash resumes where its last slice committed.
    """
    chunk = session.execute(
        select(chunks_t).where(chunks_t.c.id == chunk_id).with_for_update()).first()
    if chunk is None:
        raise ValidationFailed(f"renewal chunk {chunk_id} does not exist")
    if chunk.status != "pending":
        return ChunkResult(chunk.run_id, chunk_id, chunk.status, already_done=True)
    run = session.execute(select(runs_t).where(runs_t.c.id == chunk.run_id)).one()
    result = ChunkResult(run.id, chunk_id, "done")
    if run.status == "stopped":
        result.status = "skipped"
        return _close_chunk(session, run, chunk, result, None, stop=False)

    after, upto = chunk.after_id, chunk.upto_id
    if slice_size is not None and not run.dry_run:  # a dry run locks nothing: no slices
        a = accounts_t.c
        bound = session.scalar(select(a.id).where(a.id > after, a.id <= upto)
                               .order_by(a.id).offset(slice_size - 1).limit(1))
        if bound is not None and bound < upto:
            upto, result.more = bound, True

    as_of = as_utc(run.as_of)
    assert as_of is not None
    codes = renewing_plans(catalog, run.kind, run.tier) if (
        run.tier is None or run.tier in catalog.plans) else []
    if _is_pg(session):
        changes = _process_pg(session, run, after, upto, catalog, codes, as_of, result)
        stop = bool(result.errors) and not run.continue_on_error
    else:
        changes, stop = _process_portable(session, run, after, upto, codes, catalog,
                                          as_of, result)
    if result.more and not stop:
        return _save_slice(session, chunk, result, upto)
    result.more = False
    return _close_chunk(session, run, chunk, result, changes, stop=stop)


def _process_portable(session: Session, run: Row[Any], after: int, upto: int,
                      codes: Sequence[str], catalog: Catalog, as_of: datetime,
                      result: ChunkResult) -> tuple[list[dict[str, Any]] | None, bool]:
    """The same rules in Python (SQLite); fills ``result``, returns (changes, stop)."""
    rows = _candidates(session, run.kind, as_of, codes, after, upto, lock=not run.dry_run)
    grants: list[Grant] = []
    errors: list[dict[str, Any]] = []
    for row in rows:
        decision = _decide(row, run.kind, catalog.plans.get(row.plan_code), as_of)
        if decision is None:
            result.skipped += 1
        elif isinstance(decision, str):
            errors.append({"user_id": row.user_id, "account_id": row.id, "error": decision})
        else:
            grants.append(decision)

    stop = False
    if errors and not run.continue_on_error:
        first = min(errors, key=lambda e: e["account_id"])
        grants = [g for g in grants if g.account_id < first["account_id"]]
        errors, stop = [first], True

    granted = _granted_keys(session, run.kind, grants)
    for g in grants:
        if g.key in granted:  # granted by an earlier run; only its mark was lost
            result.skipped += 1
            g.after = g.before
    applied = [g for g in grants if g.key not in granted]
    if not run.dry_run:
        _write_portable(session, run.kind, run.id, grants, as_of)
        result.balance_changes = notify.BulkChanges.of(_balance_changes(
            session, ENTRY_TYPE[run.kind],
            [(g.user_id, g.account_id, g.key) for g in applied if g.amount != 0]))
    result.successful = len(applied)
    result.failed = len(errors)
    result.processed = result.successful + result.failed
    result.tokens = sum(g.amount for g in applied)
    result.errors = errors
    changes = [g.change() for g in applied if g.amount != 0] if run.dry_run else None
    return changes, stop


_COUNTS = ("processed", "successful", "failed", "skipped", "tokens")


def _accumulate(chunk: Row[Any], result: ChunkResult) -> None:
    """Add what the chunk's earlier slices did to ``result`` (the chunk's totals)."""
    for name in _COUNTS:
        setattr(result, name, getattr(result, name) + (getattr(chunk, name) or 0))
    result.errors = list(chunk.errors or []) + result.errors


def _save_slice(session: Session, chunk: Row[Any], result: ChunkResult,
                upto: int) -> ChunkResult:
    _accumulate(chunk, result)
    session.execute(update(chunks_t).where(chunks_t.c.id == chunk.id).values(
        after_id=upto, errors=result.errors or null(),
        **{name: getattr(result, name) for name in _COUNTS}))
    result.status = "pending"
    return result


def _close_chunk(session: Session, run: Row[Any], chunk: Row[Any], result: ChunkResult,
                 changes: list[dict[str, Any]] | None, stop: bool) -> ChunkResult:
    _accumulate(chunk, result)
    session.execute(update(chunks_t).where(chunks_t.c.id == result.chunk_id).values(
        status=result.status, processed=result.processed, successful=result.successful,
        failed=result.failed, skipped=result.skipped, tokens=result.tokens,
        errors=result.errors or null(), changes=null() if changes is None else changes,
        finished_at=func.now()))
    r = runs_t.c
    # Counted on the run row last, so its lock is held only until this commit.
    totals = session.execute(
        update(runs_t).where(r.id == run.id).values(
            chunks_done=r.chunks_done + 1,
            total_processed=r.total_processed + result.processed,
            successful=r.successful + result.successful, failed=r.failed + result.failed,
            skipped=r.skipped + result.skipped, tokens_granted=r.tokens_granted + result.tokens,
            status=case((r.status == "running", "stopped"), else_=r.status) if stop
            else r.status,
            message=(f"stopped at the first error: {result.errors[-1]['user_id']}: "
                     f"{result.errors[-1]['error']}") if stop else r.message,
        ).returning(r.chunks_done, r.total_chunks)).one()
    if totals.chunks_done >= totals.total_chunks:
        _seal(session, run.id)
        result.finished = True
    return result


def _seal(session: Session, run_id: int) -> None:
    errors: list[dict[str, Any]] = []
    for chunk_errors in session.scalars(
        select(chunks_t.c.errors).where(chunks_t.c.run_id == run_id,
                                        chunks_t.c.errors.is_not(None))
        .order_by(chunks_t.c.seq)
    ):
        errors.extend(chunk_errors or [])
        if len(errors) >= RUN_ERRORS_KEPT:
            break
    r = runs_t.c
    session.execute(update(runs_t).where(r.id == run_id).values(
        status=case((r.status == "running", "completed"), else_=r.status),
        errors=errors[:RUN_ERRORS_KEPT], finished_at=func.now()))


def fail_chunk(session: Session, chunk_id: int, reason: str) -> ChunkResult | None:
    """Give up on a chunk that kept failing: its accounts not yet done count as failed
    (slices it committed keep their counts), and the run goes on."""
    chunk = session.execute(
        select(chunks_t).where(chunks_t.c.id == chunk_id).with_for_update()).first()
    if chunk is None or chunk.status != "pending":
        return None
    run = session.execute(select(runs_t).where(runs_t.c.id == chunk.run_id)).one()
    left = max(chunk.planned - (chunk.processed or 0) - (chunk.skipped or 0), 0)
    result = ChunkResult(run.id, chunk_id, "failed", processed=left, failed=left,
                         errors=[{"chunk": chunk.seq, "accounts": f"{chunk.after_id + 1}.."
                                  f"{chunk.upto_id}", "error": reason[:2000]}])
    session.execute(update(runs_t).where(runs_t.c.id == run.id).values(status="failed",
                                                                       message=reason[:2000]))
    return _close_chunk(session, run, chunk, result, None, stop=False)


# -- reading runs --------------------------------------------------------------------------


def _run_dict(run: Row[Any]) -> dict[str, Any]:
    data = dict(run._mapping)
    data["limit"] = data.pop("account_limit")
    for k in ("as_of", "created_at", "finished_at", "alert_sent_at"):
        value = as_utc(data.get(k))
        data[k] = value.isoformat() if value else None
    data["errors"] = data.get("errors") or []
    return data


def run_report(session: Session, run_id: int, changes_limit: int = 1000) -> dict[str, Any]:
    """A run's options, totals, errors and (for dry runs) the changes it would make."""
    run = session.execute(select(runs_t).where(runs_t.c.id == run_id)).first()
    if run is None:
        raise RunNotFound(run_id)
    data = _run_dict(run)
    if run.dry_run:
        changes: list[dict[str, Any]] = []
        for chunk_changes in session.scalars(
            select(chunks_t.c.changes).where(chunks_t.c.run_id == run_id,
                                             chunks_t.c.changes.is_not(None))
            .order_by(chunks_t.c.seq)
        ):
            changes.extend(chunk_changes or [])
            if len(changes) >= changes_limit:
                break
        data["changes"] = changes[:changes_limit]
    if not data["errors"] and run.status == "running":
        data["errors"] = [e for errs in session.scalars(
            select(chunks_t.c.errors).where(chunks_t.c.run_id == run_id,
                                            chunks_t.c.errors.is_not(None))
        ) for e in (errs or [])][:RUN_ERRORS_KEPT]
    return data


def list_runs(session: Session, kind: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
    """The most recent runs, newest first (without per-account detail)."""
    stmt = select(runs_t).order_by(runs_t.c.id.desc()).limit(limit)
    if kind is not None:
        stmt = stmt.where(runs_t.c.kind == kind)
    out = []
    for run in session.execute(stmt):
        data = _run_dict(run)
        data["error_count"] = len(data.pop("errors"))
        out.append(data)
    return out


def last_scheduled_run(session: Session, kind: str) -> datetime | None:
    """When beat last started a full (untiered, unlimited, real) run of ``kind``."""
    return as_utc(session.scalar(
        select(func.max(runs_t.c.created_at)).where(
            runs_t.c.kind == kind, runs_t.c.trigger == "beat", runs_t.c.dry_run.is_(False),
            runs_t.c.tier.is_(None), runs_t.c.account_limit.is_(None))))


# -- one account ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Eligibility:
    """Whether an account's next grant is due now, and when it will be otherwise."""

    user_id: str
    plan: str
    period: str
    renewal_mode: str
    eligible: bool
    reason: str
    next_renewal_date: datetime
    days_until_renewal: int
    last_renewal: str | None
    allocation: int
    standard_balance: int | None

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["next_renewal_date"] = self.next_renewal_date.isoformat()
        return data


def eligibility(session: Session, user_id: str, catalog: Catalog,
                now: datetime) -> Eligibility:
    """Is ``user_id`` due for its daily reset or 30-day renewal at ``now``? Read-only."""
    now_utc = as_utc(now)
    assert now_utc is not None
    account = session.execute(select(accounts_t).where(accounts_t.c.user_id == user_id)).first()
    if account is None:
        raise AccountNotFound(user_id)
    wallet = session.execute(select(wallets_t.c.balance, wallets_t.c.is_active).where(
        wallets_t.c.account_id == account.id, wallets_t.c.wallet_type == STANDARD,
        wallets_t.c.expires_at.is_(None))).first()
    plan = catalog.plans.get(account.plan_code)
    balance = wallet.balance if wallet is not None else None

    def result(eligible: bool, reason: str, period: str, next_at: datetime,
               last: str | None) -> Eligibility:
        days = max(0, -(-int((next_at - now_utc).total_seconds()) // 86400))
        return Eligibility(user_id, account.plan_code, period,
                           plan.renewal_mode if plan else "-", eligible, reason, next_at,
                           0 if eligible else days, last, plan.allocation if plan else 0,
                           balance)

    if plan is None:
        return result(False, f"plan {account.plan_code!r} is not in the catalog", "-",
                      now_utc, None)
    if plan.period == "daily":
        day = _local_date(now_utc, account.timezone)
        if day is None:
            return result(False, f"unknown timezone {account.timezone!r}", "daily", now_utc,
                          account.last_reset_on)
        next_at = next_local_midnight(now_utc, account.timezone)
        due = account.last_reset_on is None or account.last_reset_on < day
        if due:
            reason = (f"daily reset due: local date in {account.timezone} is {day}, last "
                      f"reset {account.last_reset_on or 'never'}; the hourly tick applies it")
            next_at = now_utc
        else:
            reason = (f"already reset for {day} ({account.timezone}); next reset at local "
                      "midnight")
        last = account.last_reset_on
    else:
        anchor = as_utc(account.last_renewal_at or account.created_at)
        assert anchor is not None
        next_at = anchor + PERIOD_30D
        due = now_utc >= next_at
        last = anchor.isoformat()
        if due:
            reason = (f"renewal due since {next_at.date().isoformat()}: last renewal "
                      f"{anchor.date().isoformat()} is {(now_utc - anchor).days} days old")
        else:
            reason = (f"renewed {(now_utc - anchor).days} days ago; renews every 30 days, "
                      f"next on {next_at.date().isoformat()}")
    if due and wallet is None:
        return result(False, "account has no STANDARD wallet", plan.period, next_at, last)
    if due and not wallet.is_active:
        return result(False, "STANDARD wallet is inactive", plan.period, next_at, last)
    return result(due, reason, plan.period, next_at, last)


def due_count(session: Session, kind: str, catalog: Catalog, now: datetime,
              tier: str | None = None) -> int:
    """How many accounts a run of ``kind`` started at ``now`` would pick up."""
    as_of = as_utc(now)
    assert as_of is not None
    return session.scalar(select(func.count()).select_from(accounts_t).where(
        due_clause(kind, as_of, renewing_plans(catalog, kind, tier)))) or 0


# -- wallet expiry ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExpiryResult:
    """Wallets zeroed by one expiry batch; ``more`` when another batch should follow."""

    wallets: int
    tokens: int
    accounts: int
    more: bool
    # One per account whose wallets expired, for notify.stage.
    balance_changes: tuple[BalanceChange, ...] = ()


def expire_wallets(session: Session, now: datetime, limit: int = 1000) -> ExpiryResult:
    """Zero wallets past ``expires_at`` with an ``EXPIRY`` entry each. Safe to run twice."""
    now_utc = as_utc(now)
    w = wallets_t.c
    expired = and_(w.expires_at.is_not(None), w.expires_at <= now_utc, w.balance != 0)
    account_ids = list(session.scalars(
        select(w.account_id).where(expired).group_by(w.account_id).order_by(w.account_id)
        .limit(limit)))
    if not account_ids:
        return ExpiryResult(0, 0, 0, False)
    locked = {r.id: r.user_id for r in session.execute(
        select(accounts_t.c.id, accounts_t.c.user_id).where(accounts_t.c.id.in_(account_ids))
        .order_by(accounts_t.c.id).with_for_update())}
    # Re-read under the locks: a charge may have emptied a wallet meanwhile.
    wallets = session.execute(
        select(w.id, w.account_id, w.balance, w.wallet_type, w.expires_at)
        .where(expired, w.account_id.in_(list(locked))).order_by(w.id)).all()
    keys = {wl.id: f"expiry:{wl.id}" for wl in wallets}
    taken = _existing_outcomes(session, list(keys.values()))
    for wallet_id, key in keys.items():
        if key in taken:  # credited again after an earlier expiry: a new key per expiry
            keys[wallet_id] = f"{key}:{now_utc.isoformat()}"
    if wallets:
        session.execute(
            update(wallets_t).where(w.id == bindparam("_id")).values(balance=0),
            [{"_id": wl.id} for wl in wallets],
            execution_options={"synchronize_session": False})
        session.execute(entries_t.insert(), [{
            "account_id": wl.account_id, "wallet_id": wl.id, "amount": -wl.balance,
            "balance_before": wl.balance, "balance_after": 0, "type": "EXPIRY",
            "event_key": keys[wl.id],
            "metadata": {"wallet_type": wl.wallet_type,
                         "expired_at": as_utc(wl.expires_at).isoformat()},
            "created_at": now_utc} for wl in wallets])
        session.execute(outcomes_t.insert(), [{
            "key": keys[wl.id],
            "payload_hash": hashlib.sha256(json.dumps(
                ["expiry", wl.id, wl.balance]).encode()).hexdigest(),
            "user_id": locked[wl.account_id], "event_type": "expiry", "outcome": "applied",
            "reason": None, "result": {"expired": wl.balance, "wallet_id": wl.id,
                                       "wallet_type": wl.wallet_type},
            "created_at": now_utc} for wl in wallets])
    changes = _balance_changes(session, "EXPIRY", [
        (locked[wl.account_id], wl.account_id, keys[wl.id]) for wl in wallets])
    return ExpiryResult(len(wallets), sum(wl.balance for wl in wallets), len(locked),
                        len(account_ids) == limit, tuple(changes))
