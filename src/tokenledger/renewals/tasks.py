"""Renewal tasks: batch runs fanned out into chunks, wallet expiry, and the backlog check."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import func, select

from tokenledger.queue.app import app
from tokenledger.queue.base import LedgerTask, log
from tokenledger.queue.models import DeadLetter
from tokenledger.queue.names import CHECK_BACKLOG, EXPIRE_WALLETS, RENEW_BATCH, RENEW_CHUNK
from tokenledger.queue.producer import worker_producer
from tokenledger.renewals import runs
from tokenledger.renewals.service import RunOptions


class RenewalTask(LedgerTask):
    """LedgerTask whose give-up path records a failed chunk on its run, not a dead letter:
    the run still finishes, reports the chunk's accounts as failed, and can alert."""

    abstract = True

    def dead_letter(self, payload: Any, reason: str, key: str | None = None) -> None:
        args = payload.get("args") if isinstance(payload, dict) else None
        if self.name == RENEW_CHUNK and args and isinstance(args[0], int):
            runs.give_up_chunk(self.settings, args[0], reason)
            return
        super().dead_letter(payload, reason, key)


@app.task(base=RenewalTask, bind=True, name=RENEW_CHUNK)
def renew_chunk(self: RenewalTask, chunk_id: int) -> dict[str, Any]:
    """Apply one chunk of a run; a redelivered chunk changes nothing."""
    result = runs.run_chunk(self.settings, int(chunk_id))
    return {"run_id": result.run_id, "status": result.status, "processed": result.processed,
            "successful": result.successful, "failed": result.failed,
            "skipped": result.skipped, "already_done": result.already_done}


@app.task(base=RenewalTask, bind=True, name=RENEW_BATCH)
def renew_batch(self: RenewalTask, kind: str, tier: str | None = None,
                limit: int | None = None, dry_run: bool = False,
                continue_on_error: bool = True, trigger: str = "beat") -> dict[str, Any]:
    """Plan a daily-reset or monthly-renewal run and fan its chunks out to the workers.
    Safe to run twice: grants are unique per account and period."""
    options = RunOptions(kind=kind, tier=tier, limit=limit, dry_run=dry_run,
                         continue_on_error=continue_on_error,
                         chunk_size=self.settings.renewal_chunk_size, trigger=trigger)
    run_id, chunk_ids = runs.start_run(self.settings, options)
    runs.dispatch(self.settings, chunk_ids, producer=worker_producer(self.settings))
    return {"run_id": run_id, "chunks": len(chunk_ids)}


@app.task(base=RenewalTask, bind=True, name=EXPIRE_WALLETS)
def expire_wallets_task(self: RenewalTask, limit: int = 1000,
                        max_batches: int = 100) -> dict[str, int]:
    """Zero every wallet past its expiry with an EXPIRY entry: one unit of work per batch."""
    totals = {"wallets": 0, "tokens": 0, "accounts": 0, "batches": 0}
    for _ in range(max_batches):
        report = runs.expire_batch(self.settings, limit=limit)
        totals["batches"] += 1
        totals["wallets"] += report.wallets
        totals["tokens"] += report.tokens
        totals["accounts"] += report.accounts
        if not report.more:
            break
    if totals["wallets"]:
        log.info("expired %d wallet(s) on %d account(s): %d tokens", totals["wallets"],
                 totals["accounts"], totals["tokens"])
    return totals


@app.task(base=RenewalTask, bind=True, name=CHECK_BACKLOG)
def check_backlog(self: RenewalTask, window_seconds: int = 300) -> dict[str, int]:
    """Log an error when messages were dead-lettered in the last window (each one also
    went out as a ``dead_letter_added`` webhook when it was stored)."""
    with self.unit_of_work() as uow:
        cutoff = uow.now - timedelta(seconds=window_seconds)
        total = uow.session.scalar(select(func.count()).select_from(DeadLetter)) or 0
        recent = uow.session.scalar(select(func.count()).select_from(DeadLetter)
                                    .where(DeadLetter.last_seen >= cutoff)) or 0
    if recent:
        message = (f"{recent} message(s) dead-lettered in the last {window_seconds}s "
                   f"({total} in the store): see `tokenledger dlq list`")
        log.error(message)
    return {"recent": recent, "total": total}
