"""Thin tasks: validate the message, open one unit of work, call one domain function."""

from __future__ import annotations

import time
from typing import Any

from tokenledger.broker import APPLY_EVENTS
from tokenledger.catalog import current_catalog
from tokenledger.ledger import service as ledger
from tokenledger.messages import parse_batch
from tokenledger.timeutil import utcnow
from workers.base import LedgerTask, log
from workers.celery_app import app

MAX_DEFERRALS = 6


@app.task(base=LedgerTask, bind=True, name=APPLY_EVENTS)
def apply_events(self: LedgerTask, payload: Any, deferrals: int = 0) -> dict[str, int]:
    """Apply one event or a batch exactly once in effect; bad events become dead letters."""
    started = time.perf_counter()
    events, invalid = parse_batch(payload)
    now = utcnow()
    with self.unit_of_work() as session:
        for raw, reason in invalid:
            ledger.record_dead_letter(session, raw, reason, now,
                                      key=raw.get("key") if isinstance(raw, dict) else None)
        ctx = ledger.ApplyContext(current_catalog(session), now, self.settings.timezone)
        result = ledger.apply_events(session, events, ctx) if events else None
        if result is not None:
            self.stage_notifications(session, result.balance_changes, ctx)
    self.record_batch(events, len(invalid), result, started, ctx.catalog.features)
    if result is None:
        return {"dead_lettered": len(invalid)}
    if result.deferred:
        _defer(self, result.deferred, deferrals)
    counts = {"events": len(events), "dead_lettered": result.dead_lettered + len(invalid)}
    for r in result.results:
        counts[r.status] = counts.get(r.status, 0) + 1
    return counts


def _defer(task: LedgerTask, deferred: list[Any], deferrals: int) -> None:
    """Refunds that arrived before their charge: try again shortly, then dead-letter."""
    if deferrals >= MAX_DEFERRALS:
        for event in deferred:
            task.dead_letter(event.to_message(),
                             f"original charge {event.original_key!r} not found", event.key)
        return
    log.info("deferring %d event(s) waiting for their original charge", len(deferred))
    task.apply_async(args=[[e.to_message() for e in deferred]],
                     kwargs={"deferrals": deferrals + 1},
                     countdown=min(2**deferrals, 30))
