"""The beat schedule, and a scheduler that only schedules while it holds the beat lock.

Only one beat may schedule: the lock is a PostgreSQL session advisory lock on a dedicated
connection (released by the server the moment that connection dies, so a crashed beat never
blocks its successor). A beat without the lock keeps trying every few seconds and takes
over when the holder goes away.

Every job is safe to run twice (grants are unique per account and period), so a missed
window is simply caught up: when a beat takes the lock, it looks up when the last
scheduled daily and monthly runs started and lets Celery's crontab decide whether a
window was missed in between; if so, that job runs once, at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from datetime import datetime, timedelta
from typing import Any

import psycopg
from celery import beat
from celery.schedules import crontab, schedule

from tokenledger.config import Settings, get_settings
from tokenledger.db.engine import libpq_url
from tokenledger.queue.names import (
    CHECK_BACKLOG,
    COMPACT_LEDGER,
    DELIVER_WEBHOOKS,
    EXPIRE_WALLETS,
    RELEASE_EXPIRED_HOLDS,
    RENEW_BATCH,
)

log = logging.getLogger("tokenledger.beat")

# Jobs whose missed windows are caught up from the runs recorded in the database.
CATCH_UP = {"daily-reset-tick": "daily", "monthly-renewal": "monthly"}
LOCK_RETRY_SECONDS = 5.0
# One advisory lock key per purpose; advisory locks are per database.
LOCK_KEY = int.from_bytes(hashlib.sha256(b"tokenledger.beat").digest()[:8], "big",
                          signed=True)


def beat_schedule(settings: Settings | None = None) -> dict[str, dict[str, Any]]:
    """The scheduled jobs (SPEC §6), with retention's only when
    ``TOKENLEDGER_RETENTION_ENABLED``. Each message expires before its next window, so a
    backlog after an outage never replays the same tick many times over."""
    settings = settings or get_settings()
    jobs: dict[str, dict[str, Any]] = {
        # Hourly: each account resets at its own local midnight, whatever its UTC offset
        # (whole-hour zones reset on the tick after midnight; :30/:45 zones within the hour).
        "daily-reset-tick": {"task": RENEW_BATCH, "schedule": crontab(minute=0),
                             "kwargs": {"kind": "daily", "trigger": "beat"},
                             "options": {"expires": 3000}},
        "monthly-renewal": {"task": RENEW_BATCH, "schedule": crontab(hour=2, minute=0),
                            "kwargs": {"kind": "monthly", "trigger": "beat"},
                            "options": {"expires": 6 * 3600}},
        "expire-wallets": {"task": EXPIRE_WALLETS,
                           "schedule": crontab(minute="*/5"), "options": {"expires": 280}},
        "release-expired-holds": {"task": RELEASE_EXPIRED_HOLDS, "schedule": schedule(60.0),
                                  "options": {"expires": 55}},
        "check-dead-letters": {"task": CHECK_BACKLOG,
                               "schedule": crontab(minute="*/5"),
                               "kwargs": {"window_seconds": 300}, "options": {"expires": 280}},
        # The webhook relay's safety net: runs normally start on commit and on their timer.
        "deliver-webhooks": {"task": DELIVER_WEBHOOKS, "schedule": schedule(30.0),
                             "options": {"expires": 25}},
    }
    if settings.retention_enabled:
        jobs["compact-ledger"] = {"task": COMPACT_LEDGER,
                                  "schedule": crontab(hour=3, minute=30),
                                  "kwargs": {"older_than": settings.retention_older_than},
                                  "options": {"expires": 6 * 3600}}
    return jobs


class BeatLock:
    """Exclusive right to schedule, held for as long as this process lives."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._conn: psycopg.Connection[Any] | None = None

    @property
    def held(self) -> bool:
        return self._conn is not None

    def acquire(self) -> bool:
        """Take the lock if nobody holds it; never blocks."""
        try:
            conn = psycopg.connect(libpq_url(self.settings.ledger_url()), autocommit=True,
                                   connect_timeout=5, application_name="tokenledger-beat")
        except psycopg.Error as exc:
            log.warning("beat lock: database unreachable: %s", exc)
            return False
        got = conn.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,)).fetchone()
        if got and got[0]:
            self._conn = conn
            return True
        conn.close()
        return False

    def still_held(self) -> bool:
        """False when the lock was lost (the database connection died)."""
        if self._conn is None:
            return False
        try:
            self._conn.execute("SELECT 1")
            return True
        except psycopg.Error:
            self.release()
            return False

    def release(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()  # the server drops the session lock with the session
            self._conn = None


class LockedScheduler(beat.Scheduler):
    """Celery's scheduler, gated on the beat lock, catching up missed windows on takeover."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.lock = BeatLock(get_settings())
        self._waiting_logged = False
        super().__init__(*args, **kwargs)
        self.max_interval = min(self.max_interval or LOCK_RETRY_SECONDS * 3,
                                LOCK_RETRY_SECONDS * 3)

    def tick(self, *args: Any, **kwargs: Any) -> float:
        if not (self.lock.held and self.lock.still_held()):
            if not self.lock.acquire():
                if not self._waiting_logged:
                    log.warning("another beat holds the beat lock; waiting to take over")
                    self._waiting_logged = True
                return LOCK_RETRY_SECONDS
            log.warning("acquired the beat lock (pid %s); scheduling", os.getpid())
            self._waiting_logged = False
            self.catch_up()
        return super().tick(*args, **kwargs)

    def catch_up(self) -> None:
        """Let each catch-up job's schedule judge from its last recorded run."""
        from tokenledger.db.uow import unit_of_work
        from tokenledger.renewals.service import last_scheduled_run

        try:
            with unit_of_work(self.lock.settings) as uow:
                last = {name: last_scheduled_run(uow.session, kind)
                        for name, kind in CATCH_UP.items()}
        except Exception as exc:  # noqa: BLE001 - the schedule still runs on time
            log.error("cannot read the last scheduled runs for catch-up: %s", exc)
            return
        for name, last_run in last.items():
            entry = self.schedule.get(name)
            if entry is None:
                continue
            entry.last_run_at = missed_anchor(entry.schedule, last_run, self.app.now())
            if entry.is_due()[0]:
                log.warning("catching up %s: last scheduled run %s", name,
                            last_run.isoformat() if last_run else "never")

    def close(self) -> None:
        super().close()
        self.lock.release()


def missed_anchor(sched: Any, last_run: datetime | None, now: datetime) -> datetime:
    """The ``last_run_at`` that makes ``sched`` due now iff a window passed since
    ``last_run`` (never run: due now)."""
    return last_run if last_run is not None else now - timedelta(days=60)


def configure(app: Any) -> None:
    """Install the schedule and the locked scheduler on a Celery app."""
    app.conf.update(beat_schedule=beat_schedule(),
                    beat_scheduler="tokenledger.queue.beat:LockedScheduler",
                    beat_max_loop_interval=int(LOCK_RETRY_SECONDS * 3))
