"""Daily resets and monthly renewals: runs planned in keyset chunks, applied set-based.

Nothing here commits: callers (a task, the CLI, the API) own the unit of work.

How a run works, and why:
1. :func:`plan_run` fixes the run's instant (``as_of``) and cuts the due accounts into
   keyset chunks ``(after_id, upto_id]`` by account id. Every chunk judges "due" against
   the same instant, so a run is one consistent cut however long its chunks take.
2. :func:`process_chunk` handles one slice of a chunk in one short transaction: it locks
   the chunk row (a redelivered chunk waits, then sees ``done`` and changes nothing),
   locks the slice's due accounts ``FOR UPDATE`` in id order like every other writer,
   then decides and writes every grant in one data-modifying statement on the server
   (``sql/grant.sql``; the rule is ``sql/decide.sql``, "due" is ``sql/due.sql``).
3. The grant's ledger entry is keyed per account and period (``reset:<account_id>:
   <local-date>``, ``renewal:<account_id>:<period-start>``) and the entry's unique
   (event_key, wallet_id, type) makes it the once-per-period record; the account's period
   mark (``last_reset_on``/``last_renewal_at``), written in the same transaction and
   checked under the lock, keeps a re-run, a second beat or a redelivered chunk from even
   trying. System grants have no ``event_outcomes`` row: they are not client events.
4. The chunk adds its counts to the run row last (the lock on it is held only until
   commit); the chunk that finishes the run seals it, and the run's end (metrics, the
   failure-rate alert) is registered to happen after that commit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from sqlalchemy import Row, case, func, null, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from tokenledger.catalog.service import Catalog
from tokenledger.db.sql import load, statement
from tokenledger.db.uow import UnitOfWork
from tokenledger.errors import AccountNotFound, TokenLedgerError, ValidationFailed
from tokenledger.ledger.models import STANDARD, Account, Wallet
from tokenledger.notify import service as notify
from tokenledger.renewals import alerts
from tokenledger.renewals.models import RUN_KINDS, RenewalChunk, RenewalRun
from tokenledger.results import RenewalResult
from tokenledger.timeutil import as_utc, next_local_midnight
from tokenledger.webhooks import service as webhooks
from tokenledger.webhooks.models import WebhookDelivery

accounts_t = Account.__table__
wallets_t = Wallet.__table__
runs_t = RenewalRun.__table__
chunks_t = RenewalChunk.__table__

PERIOD_30D = timedelta(days=30)
ENTRY_TYPE = {"daily": "DAILY_RESET", "monthly": "RENEWAL"}
KEY_PREFIX = {"daily": "reset", "monthly": "renewal"}
PLAN_PERIOD = {"daily": "daily", "monthly": "30d"}
MAX_CHUNK = 50_000
RUN_ERRORS_KEPT = 1000
_PKG = "tokenledger.renewals"
MAX_ID = 2**63 - 1


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
    account_id: int | None = None  # one account's manual renewal: a run of one chunk

    def __post_init__(self) -> None:
        if self.kind not in RUN_KINDS:
            raise ValidationFailed(f"kind: must be one of {', '.join(RUN_KINDS)}")
        if self.limit is not None and self.limit < 1:
            raise ValidationFailed("limit: must be at least 1")
        if not 1 <= self.chunk_size <= MAX_CHUNK:
            raise ValidationFailed(f"chunk_size: must be between 1 and {MAX_CHUNK}")


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


def due_params(kind: str, as_of: datetime, plan_codes: Sequence[str], after: int = 0,
               upto: int = MAX_ID) -> dict[str, Any]:
    """The parameters of ``sql/due.sql`` for a run of ``kind`` at ``as_of``."""
    dates = _local_dates(as_of) if kind == "daily" else {}
    return {"kind": kind, "codes": list(plan_codes), "after": after, "upto": upto,
            "zones": list(dates), "days": list(dates.values()),
            "cut": as_of - PERIOD_30D}


def _due(select_list: str, tail: str = "") -> Any:
    """A statement over the due accounts (``sql/due.sql``)."""
    return text(f"SELECT {select_list} FROM {load(_PKG, 'due')} {tail}")


_NEXT_DUE = _due("a.id", "ORDER BY a.id OFFSET :skip LIMIT 1")
_DUE_IDS = _due("a.id", "ORDER BY a.id LIMIT :n")
_DUE_COUNT = _due("count(*)")
_DUE_USER = _due("count(*)", "AND a.user_id = :user_id")


# -- a slice -------------------------------------------------------------------------------


_CUSTOM_PLANS = text("SET LOCAL plan_cache_mode = force_custom_plan")


def _grant_params(run: Row[Any], after: int, upto: int, catalog: Catalog,
                  codes: Sequence[str], as_of: datetime) -> dict[str, Any]:
    plans = [catalog.plans[code] for code in codes]
    return {**due_params(run.kind, as_of, codes, after, upto),
            "allocs": [p.allocation for p in plans], "modes": [p.renewal_mode for p in plans],
            "caps": [p.rollover_cap for p in plans],
            "lows": [p.low_balance_threshold for p in plans], "as_of": as_of,
            "stop": not run.continue_on_error, "prefix": KEY_PREFIX[run.kind],
            "type": ENTRY_TYPE[run.kind], "run": run.id, "now": as_of, "skip_granted": False}


def _decide_and_write(uow: UnitOfWork, run: Row[Any], after: int, upto: int,
                      codes: Sequence[str], as_of: datetime, result: ChunkResult
                      ) -> list[dict[str, Any]] | None:
    """Decide and write accounts ``(after, upto]`` on the server; fills ``result``,
    returns a dry run's changes."""
    if not codes:
        return [] if run.dry_run else None
    session = uow.session
    params = _grant_params(run, after, upto, uow.catalog, codes, as_of)
    # Plan each slice for its own range: a generic plan guesses one row per CTE and joins
    # them by nested loops (quadratic in the slice).
    session.execute(_CUSTOM_PLANS)
    if run.dry_run:
        row = session.execute(statement(_PKG, "dry_run"), params).one()
        result.errors = list(row.errors)
        result.successful = row.grants - row.already
        result.skipped += row.already
        result.failed = len(result.errors)
        result.processed = result.successful + result.failed
        result.tokens = int(row.tokens)
        return list(row.changes)
    session.execute(statement(_PKG, "lock"), params)
    try:
        with session.begin_nested():
            row = session.execute(statement(_PKG, "grant"), params).one()
    except IntegrityError:
        # Under the locks, a grant key can only exist already if an account's period mark
        # was set back by hand: redo the slice, skipping the granted periods.
        row = session.execute(statement(_PKG, "grant"), {**params, "skip_granted": True}).one()
    if row.wallets != row.inserted or row.marked != row.grants:
        # Cannot happen while every STANDARD wallet is unique per account; never commit it.
        raise RuntimeError(f"renewal of accounts {after + 1}..{upto}: {row.inserted} entries but "
                           f"{row.wallets} wallets, {row.grants} grants but {row.marked} marks")
    result.errors = list(row.errors)
    if row.users:
        lows = notify.low_notices(row.users, row.balances, row.seqs, row.thresholds,
                                  row.crossed)
        notify.publish_after_commit(uow, notify.BulkNotices.of(row.users, row.balances,
                                                               row.seqs, lows))
    if row.hooks:
        webhooks.deliver_after_commit(uow)
    result.successful = row.grants - row.already
    result.skipped += row.already
    result.failed = len(result.errors)
    result.processed = result.successful + result.failed
    result.tokens = int(row.tokens)
    return None


# -- runs ----------------------------------------------------------------------------------


def plan_run(uow: UnitOfWork, options: RunOptions) -> RenewalRun:
    """Record a run and cut its due accounts into keyset chunks (in the caller's unit of
    work). A run with nothing due is completed at once."""
    session = uow.session
    as_of = as_utc(uow.now)
    assert as_of is not None
    codes = renewing_plans(uow.catalog, options.kind, options.tier)
    run = RenewalRun(
        kind=options.kind, status="running", trigger=options.trigger, tier=options.tier,
        account_limit=options.limit, dry_run=options.dry_run,
        continue_on_error=options.continue_on_error, as_of=as_of,
        chunk_size=options.chunk_size, candidates=0, total_chunks=0, chunks_done=0,
        total_processed=0, successful=0, failed=0, skipped=0, tokens_granted=0,
        alert=False, created_at=as_of)
    session.add(run)
    session.flush()

    chunks: list[dict[str, Any]] = []
    after, remaining = 0, options.limit
    if options.account_id is not None:
        # The chunk covers that account alone; process_chunk grants it only if still due.
        chunks.append({"run_id": run.id, "seq": 1, "after_id": options.account_id - 1,
                       "upto_id": options.account_id, "planned": 1, "status": "pending",
                       "processed": 0, "successful": 0, "failed": 0, "skipped": 0,
                       "tokens": 0})
        remaining = 0
    while remaining is None or remaining > 0:
        size = options.chunk_size if remaining is None else min(options.chunk_size, remaining)
        params = due_params(options.kind, as_of, codes, after)
        # Keyset pagination: the id of the size-th due account after the previous chunk.
        upto = session.scalar(_NEXT_DUE, {**params, "skip": size - 1})
        count = size
        if upto is None:
            tail = session.scalars(_DUE_IDS, {**params, "n": size}).all()
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
    session.flush()
    if not chunks:
        seal(uow, run.id)
    return run


def pending_chunks(session: Session, run_id: int) -> list[int]:
    """Ids of the run's chunks not processed yet, in account order."""
    return list(session.scalars(
        select(chunks_t.c.id).where(chunks_t.c.run_id == run_id,
                                    chunks_t.c.status == "pending")
        .order_by(chunks_t.c.seq)))


def process_chunk(uow: UnitOfWork, chunk_id: int, slice_size: int | None = None
                  ) -> ChunkResult:
    """Apply one chunk of a run, or only its next ``slice_size`` accounts (``more`` is then
    set until the last slice). Safe to run twice: a processed chunk changes nothing.

    Slices keep each transaction, and so each account lock a live charge may wait for,
    short, while a worker still takes a large chunk per task. A slice commits its grants
    and its counts on the chunk row together, then moves the chunk's ``after_id`` past
    itself: a chunk redelivered after a crash resumes where its last slice committed.
    """
    session, catalog = uow.session, uow.catalog
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
        return _close_chunk(uow, run, chunk, result, None, stop=False)

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
    changes = _decide_and_write(uow, run, after, upto, codes, as_of, result)
    stop = bool(result.errors) and not run.continue_on_error
    if result.more and not stop:
        return _save_slice(session, chunk, result, upto)
    result.more = False
    return _close_chunk(uow, run, chunk, result, changes, stop=stop)


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


def _close_chunk(uow: UnitOfWork, run: Row[Any], chunk: Row[Any], result: ChunkResult,
                 changes: list[dict[str, Any]] | None, stop: bool) -> ChunkResult:
    session = uow.session
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
        seal(uow, run.id)
        result.finished = True
    return result


def seal(uow: UnitOfWork, run_id: int) -> None:
    """Finish a run whose chunks are all done: its errors, status and end, then judge it
    (the failure-rate alert)."""
    session = uow.session
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
    alerts.run_finished(uow, run_report(session, run_id, changes_limit=0))


def fail_chunk(uow: UnitOfWork, chunk_id: int, reason: str) -> ChunkResult | None:
    """Give up on a chunk that kept failing: its accounts not yet done count as failed
    (slices it committed keep their counts), and the run goes on."""
    session = uow.session
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
    return _close_chunk(uow, run, chunk, result, None, stop=False)


# -- reading runs --------------------------------------------------------------------------


# When the run's failure-rate alert webhook was first delivered (the outbox's record);
# ``alert_sent_at`` itself holds what releases before the outbox recorded.
_ALERT_DELIVERED = (
    select(func.min(WebhookDelivery.delivered_at))
    .where(WebhookDelivery.event_type == "renewal_failure_alert",
           WebhookDelivery.subject == func.concat("run:", runs_t.c.id))
    .scalar_subquery().label("alert_delivered_at"))


def _run_dict(run: Row[Any]) -> dict[str, Any]:
    data = dict(run._mapping)
    delivered = data.pop("alert_delivered_at", None)
    data["alert_sent_at"] = data["alert_sent_at"] or delivered
    data["limit"] = data.pop("account_limit")
    for k in ("as_of", "created_at", "finished_at", "alert_sent_at"):
        value = as_utc(data.get(k))
        data[k] = value.isoformat() if value else None
    data["errors"] = data.get("errors") or []
    return data


def run_report(session: Session, run_id: int, changes_limit: int = 1000) -> dict[str, Any]:
    """A run's options, totals, errors and (for dry runs) the changes it would make."""
    run = session.execute(select(runs_t, _ALERT_DELIVERED).where(runs_t.c.id == run_id)).first()
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
    stmt = select(runs_t, _ALERT_DELIVERED).order_by(runs_t.c.id.desc()).limit(limit)
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
    kind = "daily" if plan.period == "daily" else "monthly"
    due = bool(session.scalar(_DUE_USER, {**due_params(kind, now_utc, [account.plan_code]),
                                          "user_id": user_id}))
    if plan.period == "daily":
        day = _local_date(now_utc, account.timezone)
        if day is None:
            return result(False, f"unknown timezone {account.timezone!r}", "daily", now_utc,
                          account.last_reset_on)
        next_at = next_local_midnight(now_utc, account.timezone)
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


def renew_account(uow: UnitOfWork, user_id: str, trigger: str = "manual") -> RenewalResult:
    """Renew one account now if it is due (``eligibility``), through a run of one chunk:
    the same grant statement and the same once-per-period key as the batch runs, so a
    manual renewal and a scheduled one never both grant a period. Not due: nothing is
    written and the reason and next date are answered."""
    from tokenledger.ledger.reports import balance

    session, now = uow.session, uow.now
    due = eligibility(session, user_id, uow.catalog, now)
    if not due.eligible:
        return RenewalResult(False, user_id, 0, None, due.reason, due.next_renewal_date)
    account_id = session.scalar(select(accounts_t.c.id).where(accounts_t.c.user_id == user_id))
    kind = "daily" if due.period == "daily" else "monthly"
    run = plan_run(uow, RunOptions(kind, limit=1, trigger=trigger, account_id=account_id))
    done = process_chunk(uow, pending_chunks(session, run.id)[0])
    after = balance(session, user_id, now).balance
    if done.successful != 1:
        error = done.errors[-1]["error"] if done.errors else "no longer due"
        return RenewalResult(False, user_id, 0, after, error, due.next_renewal_date, run.id)
    return RenewalResult(True, user_id, done.tokens, after, None, None, run.id)


def due_count(session: Session, kind: str, catalog: Catalog, now: datetime,
              tier: str | None = None) -> int:
    """How many accounts a run of ``kind`` started at ``now`` would pick up."""
    as_of = as_utc(now)
    assert as_of is not None
    return session.scalar(_DUE_COUNT, due_params(kind, as_of,
                                                 renewing_plans(catalog, kind, tier))) or 0
