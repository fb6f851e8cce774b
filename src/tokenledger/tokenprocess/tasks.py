"""The token process's task: releasing holds that were never ended."""

from __future__ import annotations

from tokenledger.queue.app import app
from tokenledger.queue.base import LedgerTask, log
from tokenledger.queue.names import RELEASE_EXPIRED_HOLDS
from tokenledger.tokenprocess import service as token_process


@app.task(base=LedgerTask, bind=True, name=RELEASE_EXPIRED_HOLDS)
def release_expired_holds(self: LedgerTask, limit: int = 1000,
                          max_chunks: int = 100) -> dict[str, int]:
    """Release every hold past its expiry, once: one unit of work per chunk of accounts.

    Beat runs it every minute; two runs at once are harmless (accounts are locked and
    their holds re-read before release). Work left after ``max_chunks`` is picked up by
    the next run.
    """
    totals = {"holds": 0, "accounts": 0, "credits": 0, "chunks": 0}
    for _ in range(max_chunks):
        with self.unit_of_work() as uow:
            report = token_process.release_expired_holds(uow, limit=limit)
        totals["chunks"] += 1
        totals["holds"] += report.holds
        totals["accounts"] += report.accounts
        totals["credits"] += report.credits
        if report.accounts < limit:
            break
    if totals["holds"]:
        log.info("released %d expired hold(s) on %d account(s), %d credits back",
                 totals["holds"], totals["accounts"], totals["credits"])
    return totals
