"""Fixtures over the real services: PostgreSQL, Redis and a real Celery worker.

Every pytest run gets its own database and its own queue name, so parallel runs on one
machine never see each other's rows or messages. Without the servers the service tests
skip on a laptop; under ``CI=true`` they fail instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis
from sqlalchemy import text

from tokenledger import LedgerClient, Settings
from tokenledger.catalog import current_catalog
from tokenledger.db import dispose_engines, unit_of_work
from tokenledger.ledger.service import ApplyContext, BatchResult, apply_events
from tokenledger.ledger.verify import verify
from tokenledger.messages import parse_event
from tokenledger.migrate import migrate
from tokenledger.schema import ledger_tables
from tokenledger.timeutil import utcnow

PG_ADMIN = os.environ.get("TOKENLEDGER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("TOKENLEDGER_TEST_REDIS", "redis://127.0.0.1:6379/0")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
ROOT = Path(__file__).resolve().parents[1]
RUN_ID = f"{os.getpid()}_{uuid.uuid4().hex[:6]}"



def _unavailable(what: str, exc: Exception) -> None:
    message = f"{what} is not reachable ({exc})"
    if IN_CI:
        pytest.fail(f"{message}: service tests must run in CI", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh, migrated PostgreSQL database for this pytest run."""
    name = f"tokenledger_test_{RUN_ID}"
    try:
        admin = psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        _unavailable("PostgreSQL", exc)
    admin.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    url = f"{base}/{name}"
    migrate(url)
    yield url
    dispose_engines(close=True)
    admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


@pytest.fixture(scope="session")
def redis_url() -> str:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping()
    except redis.RedisError as exc:
        _unavailable("Redis", exc)
    return REDIS_URL


@pytest.fixture(scope="session")
def settings(pg_url: str, redis_url: str) -> Settings:
    return Settings(database_url=pg_url, broker_url=redis_url, queue=f"tltest-{RUN_ID}",
                    visibility_timeout=30, retry_backoff_max=2, max_retries=3)


@pytest.fixture
def db(settings: Settings) -> Iterator[str]:
    """An empty ledger (catalog kept) before the test; the URL to reach it."""
    with unit_of_work(settings.database_url) as session:
        tables = ", ".join(ledger_tables())
        session.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    yield settings.database_url


def apply(url: str, *events: dict, now=None) -> BatchResult:
    """Apply raw events directly through the domain in one unit of work."""
    parsed = [parse_event(e) for e in events]
    with unit_of_work(url) as session:
        ctx = ApplyContext(current_catalog(session), now or utcnow(), "UTC")
        return apply_events(session, parsed, ctx)


def balances_by_user(url: str) -> dict[str, int]:
    """Each account's balance: the sum of all its wallets."""
    with unit_of_work(url) as session:
        return dict(session.execute(text(
            "SELECT a.user_id, sum(w.balance) FROM accounts a JOIN wallets w"
            " ON w.account_id = a.id GROUP BY a.user_id")).all())


def assert_verified(url: str) -> None:
    with unit_of_work(url) as session:
        report = verify(session)
    assert report.ok, report.as_dict()


class Worker:
    """A real ``celery -A workers worker`` process on the test's broker and database."""

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
            "TOKENLEDGER_DATABASE_URL": settings.database_url,
            "TOKENLEDGER_BROKER_URL": settings.broker_url,
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
                [sys.executable, "-m", "celery", "-A", "workers", "worker", "-Q",
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
            time.sleep(0.1)
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


@pytest.fixture(scope="session")
def worker(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    """One worker shared by the pipeline tests of this run."""
    w = Worker(settings, tmp_path_factory.mktemp("worker")).start()
    yield w
    w.stop()


@pytest.fixture
def client(settings: Settings, db: str) -> Iterator[LedgerClient]:
    with LedgerClient(settings) as c:
        yield c


def wait_for(client: LedgerClient, keys: list[str], timeout: float = 60) -> dict:
    """Each key's final outcome, waiting for all of them."""
    deadline = time.monotonic() + timeout
    return {k: client.result(k, timeout=max(0.1, deadline - time.monotonic())) for k in keys}
