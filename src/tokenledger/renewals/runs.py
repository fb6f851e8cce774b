"""Driving a run from an edge (a task, a CLI command, an HTTP route).

Each step is its own unit of work, opened here because a run is long by design: planning
is one, and every slice of every chunk is one (so a live charge never waits long for a
renewing account's lock). Chunks are processed in this process (small runs, the CLI) or
published as ``tokenledger.renew_chunk`` tasks for the workers to take in parallel.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from tokenledger.config import Settings
from tokenledger.db.errors import RetryPolicy
from tokenledger.db.uow import unit_of_work
from tokenledger.queue.names import RENEW_CHUNK
from tokenledger.queue.producer import Producer
from tokenledger.renewals.expiry import ExpiryResult, expire_wallets
from tokenledger.renewals.service import (
    ChunkResult,
    RunOptions,
    fail_chunk,
    pending_chunks,
    plan_run,
    process_chunk,
    run_report,
)

log = logging.getLogger("tokenledger.renewals")

# A chunk processed in this process is tried again after a transient failure this way.
INLINE = RetryPolicy(attempts=5, first_delay=0.2, max_delay=5.0)


def start_run(settings: Settings, options: RunOptions, now: datetime | None = None
              ) -> tuple[int, list[int]]:
    """Record and plan a run; returns its id and the chunk ids still to process."""
    with unit_of_work(settings, now=now) as uow:
        run = plan_run(uow, options)
        run_id, total = run.id, run.total_chunks
        chunk_ids = pending_chunks(uow.session, run_id)
    log.info("planned %s run %s: %s chunk(s)", options.kind, run_id, total)
    return run_id, chunk_ids


def run_chunk(settings: Settings, chunk_id: int, slice_size: int | None = None
              ) -> ChunkResult:
    """Process one chunk, one unit of work per slice of ``slice_size`` accounts (default:
    ``settings.renewal_slice_size``); the last chunk of a run seals it."""
    slice_size = slice_size or settings.renewal_slice_size
    while True:
        with unit_of_work(settings) as uow:
            result = process_chunk(uow, chunk_id, slice_size)
        if not result.more:
            return result


def give_up_chunk(settings: Settings, chunk_id: int, reason: str) -> None:
    """Mark a chunk that kept failing as failed, so its run still finishes and reports."""
    with unit_of_work(settings) as uow:
        fail_chunk(uow, chunk_id, reason)


def execute_inline(settings: Settings, chunk_ids: list[int],
                   on_chunk: Callable[[ChunkResult], None] | None = None) -> None:
    """Process chunks one after another in this process (small runs, the CLI)."""
    for chunk_id in chunk_ids:
        try:
            result = INLINE.run(lambda chunk_id=chunk_id: run_chunk(settings, chunk_id))
        except Exception as exc:  # noqa: BLE001 - the run records it and goes on
            log.error("renewal chunk %s failed: %s", chunk_id, exc)
            give_up_chunk(settings, chunk_id, f"{type(exc).__name__}: {exc}")
            continue
        if on_chunk is not None:
            on_chunk(result)


def expire_batch(settings: Settings, now: datetime | None = None, limit: int = 1000
                 ) -> ExpiryResult:
    """Zero up to ``limit`` accounts' expired wallets in one unit of work."""
    with unit_of_work(settings, now=now) as uow:
        return expire_wallets(uow, limit=limit)


def dispatch(settings: Settings, chunk_ids: list[int], producer: Producer | None = None) -> int:
    """Publish one ``renew_chunk`` task per chunk; the workers process them in parallel.
    Publishing a chunk twice is harmless: a processed chunk changes nothing."""
    own = producer is None
    producer = producer or Producer(settings)
    try:
        producer.send_many(RENEW_CHUNK, [[chunk_id] for chunk_id in chunk_ids],
                           queue=settings.renewal_queue or settings.tasks_queue)
    finally:
        if own:
            producer.close()
    return len(chunk_ids)


def wait_for_run(settings: Settings, run_id: int, timeout: float | None = None,
                 on_progress: Callable[[dict[str, Any]], None] | None = None,
                 interval: float = 0.25) -> dict[str, Any]:
    """Poll the run until it is sealed (or ``timeout``); returns its latest report."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        with unit_of_work(settings) as uow:
            report = run_report(uow.session, run_id, changes_limit=0)
        if on_progress is not None:
            on_progress(report)
        if report["finished_at"] is not None:
            return report
        if deadline is not None and time.monotonic() >= deadline:
            return report
        time.sleep(interval)
