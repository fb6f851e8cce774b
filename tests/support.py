"""What tests share besides fixtures: a real worker process, and helpers that apply events
and check the ledger's invariants."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from tokenledger import LedgerClient, Settings
from tokenledger.db.engine import session_factory
from tokenledger.db.uow import unit_of_work
from tokenledger.ledger.service import BatchResult, apply_events
from tokenledger.ledger.verify import verify
from tokenledger.messages import parse_event
from tokenledger.notify.publisher import flush_published

ROOT = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
CELERY_APP = "tokenledger.queue.app"


@contextmanager
def session_scope(settings: Settings) -> Iterator[Session]:
    """A plain session in one transaction (committed at the end): for arranging a test's
    rows and reading them back, outside any domain code."""
    with session_factory(settings.ledger_url()).begin() as session:
        yield session


def apply(settings: Settings, *events: dict, now: datetime | None = None) -> BatchResult:
    """Apply raw events directly through the domain in one unit of work; returns once
    their balance notices are published."""
    parsed = [parse_event(e) for e in events]
    with unit_of_work(settings, now=now) as uow:
        result = apply_events(uow, parsed)
    assert flush_published(10)
    return result


def balances_by_user(settings: Settings) -> dict[str, int]:
    """Each account's balance: the sum of all its wallets."""
    with session_scope(settings) as session:
        return dict(session.execute(text(
            "SELECT a.user_id, sum(w.balance) FROM accounts a JOIN wallets w"
            " ON w.account_id = a.id GROUP BY a.user_id")).all())


def assert_verified(settings: Settings) -> None:
    with session_scope(settings) as session:
        report = verify(session)
    assert report.ok, report.as_dict()


class Worker:
    """A real ``celery -A tokenledger.queue.app worker`` on the test's broker and database."""

    def __init__(self, settings: Settings, tmp: Path, concurrency: int = 2,
                 extra_env: dict[str, str] | None = None) -> None:
        self.settings = settings
        self.log = tmp / f"worker-{uuid.uuid4().hex[:6]}.log"
        self.env = {**os.environ, **self.env_for(settings), **(extra_env or {})}
        self.concurrency = concurrency
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def env_for(settings: Settings) -> dict[str, str]:
        return {
            "TOKENLEDGER_DATABASE_URL": settings.ledger_url(),
            "TOKENLEDGER_BROKER_URL": settings.broker(),
            "TOKENLEDGER_HOME": str(settings.home),
            "TOKENLEDGER_QUEUE": settings.queue,
            "TOKENLEDGER_VISIBILITY_TIMEOUT": str(settings.visibility_timeout),
            "TOKENLEDGER_RETRY_BACKOFF_MAX": str(settings.retry_backoff_max),
            "TOKENLEDGER_MAX_RETRIES": str(settings.max_retries),
            "TOKENLEDGER_TIMEZONE": settings.timezone,
            "TOKENLEDGER_HOLD_TTL_SECONDS": str(settings.hold_ttl_seconds),
        }

    def start(self, timeout: float = 60) -> Worker:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", CELERY_APP, "worker", "-Q",
                 self.settings.queue, "-c", str(self.concurrency), "-l", "info",
                 "--without-gossip", "--without-mingle", "--without-heartbeat",
                 "-n", f"tltest-{uuid.uuid4().hex[:8]}@%h"],
                cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if b" ready." in self.log.read_bytes():
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited early:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.05)
        raise RuntimeError(f"worker not ready:\n{self.log.read_text()[-3000:]}")

    def kill(self, sig: int = 9) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()


def wait_for(client: LedgerClient, keys: list[str], timeout: float = 60) -> dict:
    """Each key's final outcome, waiting for all of them."""
    deadline = time.monotonic() + timeout
    return {k: client.result(k, timeout=max(0.1, deadline - time.monotonic())) for k in keys}


def run_cli(settings: Settings, *args: str, **env: str) -> Any:
    """A ``tokenledger`` command run in this process (typer's CliRunner), with the
    test's settings in its environment; its result (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    from tokenledger.cli.base import app, console, err_console
    from tokenledger.config import get_settings

    get_settings.cache_clear()
    console.cache_clear()
    err_console.cache_clear()
    try:
        return CliRunner().invoke(app, list(args), env={**Worker.env_for(settings), **env},
                                  catch_exceptions=False)
    finally:
        get_settings.cache_clear()
