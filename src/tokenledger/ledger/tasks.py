"""The ledger's task: validate a message, open one unit of work, apply it."""

from __future__ import annotations

import time
from typing import Any

from tokenledger.ledger import service as ledger
from tokenledger.messages import parse_batch
from tokenledger.queue import deadletters
from tokenledger.queue.app import app
from tokenledger.queue.base import LedgerTask, log
from tokenledger.queue.names import APPLY_EVENTS

MAX_DEFERRALS = 6


@app.task(base=LedgerTask, bind=True, name=APPLY_EVENTS)
def apply_events(self: LedgerTask, payload: Any, deferrals: int = 0) -> dict[str, int]:
    """Apply one event or a batch exactly once in effect; bad events become dead letters."""
    started = time.perf_counter()
    events, invalid = parse_batch(payload)
    with self.unit_of_work() as uow:
        for raw, reason in invalid:
            deadletters.record(uow.session, raw, reason, uow.now,
                               key=raw.get("key") if isinstance(raw, dict) else None)
        result = ledger.apply_events(uow, events) if events else None
        if result is not None and result.deferred:
            uow.after_commit(lambda: _defer(self, result.deferred, deferrals))
        features = uow.catalog.features
    self.record_batch(events, len(invalid), result, started, features)
    if result is None:
        return {"dead_lettered": len(invalid)}
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
