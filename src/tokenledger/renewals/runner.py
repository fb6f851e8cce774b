"""Running a batch: plan it, then process its chunks in this process or on the workers.

Each step here is its own unit of work; the domain functions in ``service`` never commit.
Dispatching publishes ``tokenledger.renew_chunk`` by name, as the SDK publishes events, so
this module needs no worker code.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from celery import Celery

from tokenledger import notify
from tokenledger.broker import celery_config
from tokenledger.catalog import current_catalog
from tokenledger.config import Settings
from tokenledger.db import is_transient, unit_of_work
from tokenledger.renewals import alerts
from tokenledger.renewals.service import (
    ChunkResult,
    ExpiryResult,
    RunOptions,
    expire_wallets,
    fail_chunk,
    pending_chunks,
    plan_run,
    process_chunk,
    run_report,
)
from tokenledger.timeutil import utcnow

log = logging.getLogger("tokenledger.renewals")

RENEW_CHUNK = "tokenledger.renew_chunk"
INLINE_ATTEMPTS = 5


def start_run(settings: Settings, options: RunOptions, now: datetime | None = None
              ) -> tuple[int, list[int]]:
    """Record and plan a run; returns its id and the chunk ids still to process."""
    with unit_of_work(settings.database_url) as session:
        run = plan_run(session, options, current_catalog(session), now or utcnow())
        run_id, total = run.id, run.total_chunks
        chunk_ids = pending_chunks(session, run_id)
    log.info("planned %s run %s: %s chunk(s)", options.kind, run_id, total)
    if total == 0:
        alerts.on_run_finished(settings, run_id)
    return run_id, chunk_ids


def run_chunk(settings: Settings, chunk_id: int, slice_size: int | None = None
              ) -> ChunkResult:
    """Process one chunk, one short transaction per slice of ``slice_size`` accounts
    (default: ``settings.renewal_slice_size``), then finish the run if it was the last
    chunk."""
    slice_size = slice_size or settings.renewal_slice_size
    while True:
        with unit_of_work(settings.database_url) as session:
            catalog = current_catalog(session)
            result = process_chunk(session, chunk_id, catalog, slice_size)
            # balance_changed for every granted account, once this slice commits; sent
            # from a background thread while the next slice runs.
            if result.balance_changes is not None:
                notify.stage_bulk(session, settings, result.balance_changes, catalog,
                                  utcnow())
        if not result.more:
            break
    if result.finished:
        alerts.on_run_finished(settings, result.run_id)
    return result


def expire_batch(settings: Settings, now: datetime | None = None, limit: int = 1000
                 ) -> ExpiryResult:
    """Zero up to ``limit`` accounts' expired wallets in one unit of work, and tell
    subscribers each account's new balance once it commits."""
    with unit_of_work(settings.database_url) as session:
        now = now or utcnow()
        result = expire_wallets(session, now, limit=limit)
        if result.balance_changes:
            notify.stage(session, settings, result.balance_changes, current_catalog(session),
                         now)
    return result


def give_up_chunk(settings: Settings, chunk_id: int, reason: str) -> None:
    """Mark a chunk that kept failing as failed, so its run still finishes and reports."""
    with unit_of_work(settings.database_url) as session:
        result = fail_chunk(session, chunk_id, reason)
    if result is not None and result.finished:
        alerts.on_run_finished(settings, result.run_id)


def execute_inline(settings: Settings, chunk_ids: list[int],
                   on_chunk: Callable[[ChunkResult], None] | None = None) -> None:
    """Process chunks one after another in this process (small runs, the embedded demo)."""
    for chunk_id in chunk_ids:
        for attempt in range(INLINE_ATTEMPTS):
            try:
                result = run_chunk(settings, chunk_id)
                break
            except Exception as exc:
                if not is_transient(exc) or attempt == INLINE_ATTEMPTS - 1:
                    log.error("renewal chunk %s failed: %s", chunk_id, exc)
                    give_up_chunk(settings, chunk_id, f"{type(exc).__name__}: {exc}")
                    result = None
                    break
                time.sleep(0.2 * 2**attempt)
        if on_chunk is not None and result is not None:
            on_chunk(result)


def producer(settings: Settings) -> Celery:
    """A Celery app that only publishes (no worker code imported)."""
    app = Celery("tokenledger-renewals", set_as_current=False)
    app.conf.update(celery_config(settings))
    return app


def dispatch(settings: Settings, chunk_ids: list[int], app: Celery | None = None) -> int:
    """Publish one ``renew_chunk`` task per chunk; the workers process them in parallel.
    Publishing a chunk twice is harmless: a processed chunk changes nothing."""
    owned = app is None
    app = app or producer(settings)
    queue = settings.renewal_queue or settings.queue
    try:
        with app.producer_or_acquire() as pub:
            for chunk_id in chunk_ids:
                app.send_task(RENEW_CHUNK, args=[chunk_id], queue=queue, producer=pub)
    finally:
        if owned:
            app.close()
    return len(chunk_ids)


def wait_for_run(settings: Settings, run_id: int, timeout: float | None = None,
                 on_progress: Callable[[dict[str, Any]], None] | None = None,
                 interval: float = 0.25) -> dict[str, Any]:
    """Poll the run until it is sealed (or ``timeout``); returns its latest report."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        with unit_of_work(settings.database_url) as session:
            report = run_report(session, run_id, changes_limit=0)
        if on_progress is not None:
            on_progress(report)
        if report["finished_at"] is not None:
            return report
        if deadline is not None and time.monotonic() >= deadline:
            return report
        time.sleep(interval)
