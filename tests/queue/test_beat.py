"""The beat schedule, its single-scheduler lock and the catch-up of missed windows."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
from celery.schedules import crontab, schedule

from tests.support import ROOT, Worker, session_scope
from tokenledger import Settings
from tokenledger.queue.beat import BeatLock, beat_schedule, missed_anchor
from tokenledger.renewals.models import RenewalRun
from tokenledger.renewals.service import last_scheduled_run

pytestmark = pytest.mark.services


def test_the_schedule_has_every_job() -> None:
    from tokenledger.queue.app import app

    jobs = app.conf.beat_schedule
    assert app.conf.beat_scheduler == "tokenledger.queue.beat:LockedScheduler"
    assert jobs["daily-reset-tick"]["task"] == "tokenledger.renew_batch"
    assert jobs["daily-reset-tick"]["kwargs"]["kind"] == "daily"
    assert jobs["daily-reset-tick"]["schedule"] == crontab(minute=0)
    assert jobs["monthly-renewal"]["kwargs"]["kind"] == "monthly"
    assert jobs["monthly-renewal"]["schedule"] == crontab(hour=2, minute=0)
    assert jobs["expire-wallets"]["task"] == "tokenledger.expire_wallets"
    assert jobs["expire-wallets"]["schedule"] == crontab(minute="*/5")
    assert jobs["release-expired-holds"]["task"] == "tokenledger.release_expired_holds"
    assert jobs["release-expired-holds"]["schedule"] == schedule(60.0)
    assert jobs["check-dead-letters"]["task"] == "tokenledger.check_backlog"
    app.loader.import_default_modules()
    for job in jobs.values():  # every scheduled task is registered on the workers
        assert job["task"] in app.tasks, job["task"]


@pytest.mark.parametrize(("last_run", "due"), [
    (None, True),                                              # never ran
    (datetime(2026, 5, 3, 2, 0, 5, tzinfo=UTC), False),         # ran in today's window
    (datetime(2026, 5, 2, 2, 0, 5, tzinfo=UTC), True),          # beat was down at 02:00
])
def test_a_missed_monthly_window_is_caught_up_once(last_run: datetime | None,
                                                   due: bool) -> None:
    now = datetime(2026, 5, 3, 9, 30, tzinfo=UTC)
    sched = beat_schedule()["monthly-renewal"]["schedule"]
    sched.nowfun = lambda: now
    assert sched.is_due(missed_anchor(sched, last_run, now))[0] is due


def test_only_beat_runs_count_for_catch_up(settings: Settings, db: str) -> None:
    at = datetime(2026, 5, 3, 2, 0, tzinfo=UTC)
    with session_scope(db) as session:
        for trigger, tier, created in (("beat", None, at), ("cli", None, at + timedelta(hours=1)),
                                       ("beat", "Gift", at + timedelta(hours=2))):
            session.add(RenewalRun(kind="monthly", status="completed", trigger=trigger,
                                   tier=tier, dry_run=False, continue_on_error=True, as_of=created,
                                   chunk_size=10, candidates=0, total_chunks=0, chunks_done=0,
                                   total_processed=0, successful=0, failed=0, skipped=0,
                                   tokens_granted=0, alert=False, created_at=created))
    with session_scope(db) as session:
        assert last_scheduled_run(session, "monthly") == at
        assert last_scheduled_run(session, "daily") is None


def test_the_beat_lock_is_exclusive_and_freed_when_its_holder_goes(settings: Settings) -> None:
    first, second = BeatLock(settings), BeatLock(settings)
    try:
        assert first.acquire() and first.still_held()
        assert not second.acquire()
        first.release()
        assert second.acquire()
    finally:
        first.release()
        second.release()


def _start_beat(settings: Settings, queue: str, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, **Worker.env_for(settings), "TOKENLEDGER_QUEUE": queue,
           "TOKENLEDGER_LOG_JSON": "false"}
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tokenledger.queue.app", "beat", "-l", "info"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for(log: Path, needle: str, timeout: float = 45) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if needle in log.read_text(errors="replace"):
            return
        time.sleep(0.2)
    raise AssertionError(f"{needle!r} not in {log}:\n{log.read_text(errors='replace')[-3000:]}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(timeout=10)


@pytest.mark.slow
def test_a_second_beat_waits_while_the_first_holds_the_lock(settings: Settings, db: str,
                                                             redis_url: str,
                                                             tmp_path: Path) -> None:
    # A queue nobody consumes: the sent ticks stay in Redis, where we can count them.
    queue = f"tlbeat-{uuid.uuid4().hex[:8]}"
    broker = redis.Redis.from_url(redis_url)
    log1, log2 = tmp_path / "beat1.log", tmp_path / "beat2.log"
    beat1 = _start_beat(settings, queue, log1)
    beat2 = None
    try:
        _wait_for(log1, "acquired the beat lock")
        # Nothing ran before: the takeover catches up the daily tick and the monthly run.
        _wait_for(log1, "catching up monthly-renewal")
        _wait_for(log1, "Sending due task monthly-renewal")
        beat2 = _start_beat(settings, queue, log2)
        _wait_for(log2, "another beat holds the beat lock")
        time.sleep(3)
        assert "Sending due task" not in log2.read_text(errors="replace")
        sent_by_first = broker.llen(f"{queue}.tasks")  # beat sends to <queue>.tasks
        assert sent_by_first >= 2

        _stop(beat1)
        _wait_for(log2, "acquired the beat lock", timeout=30)
        _wait_for(log2, "Sending due task")
    finally:
        _stop(beat1)
        if beat2 is not None:
            _stop(beat2)
        broker.delete(queue, f"{queue}.tasks")
        broker.close()


def test_the_relay_runs_every_30_s_and_compaction_only_when_enabled(settings: Settings) -> None:
    jobs = beat_schedule(settings)
    assert jobs["deliver-webhooks"]["task"] == "tokenledger.deliver_webhooks"
    assert jobs["deliver-webhooks"]["schedule"] == schedule(30.0)
    assert "compact-ledger" not in jobs  # off by default
    enabled = beat_schedule(settings.model_copy(update={"retention_enabled": True,
                                                        "retention_older_than": "90d"}))
    job = enabled["compact-ledger"]
    assert (job["task"], job["kwargs"]) == ("tokenledger.compact_ledger", {"older_than": "90d"})
    assert job["schedule"] == crontab(hour=3, minute=30)
    from tokenledger.queue.app import app

    app.loader.import_default_modules()
    assert {"tokenledger.deliver_webhooks", "tokenledger.compact_ledger"} <= set(app.tasks)
