"""Retention: old entries folded into one CARRY_FORWARD entry per wallet, online.

A compaction with cut-off C (``--older-than 400d``: C is 400 days ago) goes through the
accounts in chunks, each its own short unit of work beside live traffic
(:func:`compact_chunk`): each wallet's entries dated before C, up to the first that is
not, are copied to ``ledger_entries_archive`` and replaced by their last one rewritten as
a carry-forward of their sum. Every wallet still equals the sum of its entries and every
entry still continues the one before, so ``verify`` holds before, during and after; a
balance as of any moment at or after C is still answered from the ledger.

A compaction changes no balance and touches only entries older than C, while writers
only append newer entries: it takes no account row lock, so live writes never wait for
it. What it must not race, another compaction or an erasure of the same account, takes
the account's advisory lock (:func:`claim_account`) first.

Idempotency outcomes outlive their entries by ``TOKENLEDGER_RETENTION_KEY_GRACE_DAYS``:
an outcome is archived only once it is older than C minus the grace and no entry carries
its key. A redelivery of an event is recognized as a duplicate as long as it arrives
within ``older_than + grace`` of the event's first application (430 days by default);
after that it would be applied as new. Ended webhook deliveries older than C are deleted.

Each step is its own unit of work, opened here because a compaction is long by design
(like a renewal run). Running two at once, or one twice, is harmless: a wallet whose old
part is already one carry-forward is left as it is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, text, update

from tokenledger.config import Settings
from tokenledger.db.errors import RetryPolicy
from tokenledger.db.sql import statement
from tokenledger.db.uow import UnitOfWork, unit_of_work
from tokenledger.ledger.models import EventOutcome
from tokenledger.retention.models import RetentionRun
from tokenledger.timeutil import utcnow

log = logging.getLogger("tokenledger.retention")

_PKG = "tokenledger.retention"
OUTCOME_CHUNK = 10_000  # keys looked at per outcome-pruning transaction
DELIVERY_CHUNK = 10_000
MIN_AGE = timedelta(days=1)
# The first key of the compaction's per-account advisory locks (the second is the id).
LOCK_SPACE = 190_011
# A chunk that failed for a transient reason (a lost connection) is tried again.
CHUNK_RETRY = RetryPolicy(attempts=5, first_delay=0.2, max_delay=5.0)


@dataclass(slots=True)
class CompactionReport:
    """What a compaction did (or, dry, would do)."""

    run_id: int
    cutoff: datetime
    key_cutoff: datetime
    dry_run: bool
    status: str = "running"
    accounts: int = 0
    wallets: int = 0
    entries_archived: int = 0
    carry_forwards: int = 0
    outcomes_archived: int = 0
    deliveries_deleted: int = 0
    chunks: int = 0
    fold_seconds: float = 0.0  # the chunks; the rest of ``seconds`` is pruning
    seconds: float = 0.0
    message: str | None = None

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["cutoff"] = self.cutoff.isoformat()
        data["key_cutoff"] = self.key_cutoff.isoformat()
        return data


@dataclass(frozen=True, slots=True)
class ChunkCounts:
    """One chunk's accounts and what was folded in them."""

    upto: int | None
    accounts: int
    wallets: int
    archived: int
    carried: int


def compact_chunk(uow: UnitOfWork, run_id: int, after: int, limit: int, cutoff: datetime,
                  dry_run: bool = False) -> ChunkCounts:
    """Fold the old entries of the ``limit`` accounts after id ``after`` (``sql/lock.sql``
    then ``sql/compact.sql``), or only count them when ``dry_run`` (``sql/plan.sql``)."""
    session = uow.session
    params = {"after": after, "limit": limit, "cutoff": cutoff, "run": run_id, "now": uow.now}
    if dry_run:
        row = session.execute(statement(_PKG, "plan"), params).one()
        return ChunkCounts(row.upto, row.accounts, row.wallets, row.archived, row.carried)
    claimed = session.execute(statement(_PKG, "lock"), {**params, "space": LOCK_SPACE}).one()
    if not claimed.accounts:
        return ChunkCounts(None, 0, 0, 0, 0)
    row = session.execute(statement(_PKG, "compact"), {**params, "upto": claimed.upto}).one()
    return ChunkCounts(claimed.upto, claimed.accounts, row.wallets, row.archived, row.carried)


def claim_account(uow: UnitOfWork, account_id: int) -> None:
    """Take the account's compaction lock (``sql/lock.sql``'s) until ``uow`` ends: no
    compaction folds its entries meanwhile (an erasure takes it)."""
    uow.session.execute(text("SELECT pg_advisory_xact_lock(CAST(:space AS integer),"
                             " CAST(:id % 2147483647 AS integer))"),
                        {"space": LOCK_SPACE, "id": account_id})


def prune_outcomes(uow: UnitOfWork, run_id: int, after: str, limit: int,
                   key_cutoff: datetime) -> tuple[str | None, int, int]:
    """Archive the outcomes past their grace among the ``limit`` keys after ``after``;
    (the last key looked at, how many looked at, how many archived)."""
    row = uow.session.execute(statement(_PKG, "prune_outcomes"), {
        "after": after, "limit": limit, "key_cutoff": key_cutoff, "run": run_id,
        "now": uow.now}).one()
    return row.upto, row.scanned, row.archived


def prune_deliveries(uow: UnitOfWork, cutoff: datetime, limit: int) -> int:
    """Delete up to ``limit`` webhook deliveries that ended before ``cutoff``."""
    return int(uow.session.execute(statement(_PKG, "prune_deliveries"),
                                   {"cutoff": cutoff, "limit": limit}).scalar_one())


def compact(settings: Settings, older_than: timedelta, *, dry_run: bool = False,
            chunk_size: int | None = None, trigger: str = "cli",
            now: datetime | None = None,
            on_chunk: Callable[[CompactionReport], None] | None = None) -> CompactionReport:
    """Fold every wallet's entries older than ``older_than`` into carry-forwards, archive
    them, prune outcomes past their grace and ended webhook deliveries, recording the run.
    A dry run changes nothing but its record. Safe to run twice or concurrently."""
    if older_than < MIN_AGE:
        from tokenledger.errors import ValidationFailed

        raise ValidationFailed("older_than: must be at least 1 day")
    started = utcnow()
    now = now or started
    cutoff = now - older_than
    key_cutoff = cutoff - timedelta(days=settings.retention_key_grace_days)
    limit = chunk_size or settings.retention_chunk_size
    with unit_of_work(settings, now=now) as uow:
        run = RetentionRun(cutoff=cutoff, key_cutoff=key_cutoff, dry_run=dry_run,
                           trigger=trigger, status="running", accounts=0, wallets=0,
                           entries_archived=0, carry_forwards=0, outcomes_archived=0,
                           deliveries_deleted=0, created_at=now)
        uow.session.add(run)
        uow.session.flush()
        report = CompactionReport(run.id, cutoff, key_cutoff, dry_run)
    try:
        _fold_all(settings, report, limit, on_chunk)
        report.fold_seconds = round((utcnow() - started).total_seconds(), 3)
        if dry_run:
            with unit_of_work(settings) as uow:
                report.outcomes_archived = uow.session.scalar(
                    select(func.count()).select_from(EventOutcome)
                    .where(EventOutcome.created_at < key_cutoff)) or 0
        else:
            _prune(settings, report)
        report.status = "completed"
    except BaseException as exc:
        report.status, report.message = "failed", f"{type(exc).__name__}: {exc}"[:2000]
        raise
    finally:
        report.seconds = round((utcnow() - started).total_seconds(), 3)
        _record(settings, report)
    log.info("compaction %s %s: %d accounts, %d entries archived into %d carry-forwards, "
             "%d outcomes archived, %d deliveries deleted in %.1f s", report.run_id,
             report.status, report.accounts, report.entries_archived, report.carry_forwards,
             report.outcomes_archived, report.deliveries_deleted, report.seconds)
    return report


def _fold_all(settings: Settings, report: CompactionReport, limit: int,
              on_chunk: Callable[[CompactionReport], None] | None) -> None:
    after = 0
    while True:
        def chunk(after: int = after) -> ChunkCounts:
            with unit_of_work(settings) as uow:
                return compact_chunk(uow, report.run_id, after, limit, report.cutoff,
                                     report.dry_run)

        counts = CHUNK_RETRY.run(chunk)
        report.chunks += 1
        report.accounts += counts.accounts
        report.wallets += counts.wallets
        report.entries_archived += counts.archived
        report.carry_forwards += counts.carried
        if on_chunk is not None:
            on_chunk(report)
        if counts.upto is None or counts.accounts < limit:
            return
        after = counts.upto


def _prune(settings: Settings, report: CompactionReport) -> None:
    after = ""
    while True:
        def outcomes(after: str = after) -> tuple[str | None, int, int]:
            with unit_of_work(settings) as uow:
                return prune_outcomes(uow, report.run_id, after, OUTCOME_CHUNK,
                                      report.key_cutoff)

        upto, scanned, archived = CHUNK_RETRY.run(outcomes)
        report.outcomes_archived += archived
        if upto is None or scanned < OUTCOME_CHUNK:
            break
        after = upto
    while True:
        with unit_of_work(settings) as uow:
            deleted = prune_deliveries(uow, report.cutoff, DELIVERY_CHUNK)
        report.deliveries_deleted += deleted
        if deleted < DELIVERY_CHUNK:
            break


def _record(settings: Settings, report: CompactionReport) -> None:
    with unit_of_work(settings) as uow:
        uow.session.execute(update(RetentionRun).where(RetentionRun.id == report.run_id).values(
            status=report.status, accounts=report.accounts, wallets=report.wallets,
            entries_archived=report.entries_archived, carry_forwards=report.carry_forwards,
            outcomes_archived=report.outcomes_archived,
            deliveries_deleted=report.deliveries_deleted, message=report.message,
            finished_at=uow.now))
