"""Fixtures over the real services: PostgreSQL, Redis and a real Celery worker.

Every pytest run gets its own database and its own queue name, so parallel runs on one
machine never see each other's rows or messages. Without the servers the service tests
skip on a laptop; under ``CI=true`` they fail instead.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from tests.support import IN_CI, Worker, session_scope
from tokenledger import LedgerClient, Settings
from tokenledger.db.direct import close_all
from tokenledger.db.engine import dispose_engines
from tokenledger.db.migrate import migrate
from tokenledger.db.schema import ledger_tables

PG_ADMIN = os.environ.get("TOKENLEDGER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("TOKENLEDGER_TEST_REDIS", "redis://127.0.0.1:6379/0")
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
    close_all()  # the SDK's and the CLI's quick-read connections
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
def settings(pg_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(database_url=pg_url, broker_url=redis_url, queue=f"tltest-{RUN_ID}",
                    visibility_timeout=30, retry_backoff_max=2, max_retries=3,
                    home=tmp_path_factory.mktemp("home"),
                    dashboard_secret="tokenledger-tests-dashboard-secret")


@pytest.fixture
def db(settings: Settings) -> Iterator[Settings]:
    """An empty ledger (catalog kept) before the test; the settings to reach it."""
    tables = ", ".join(ledger_tables())
    for attempt in range(5):
        try:
            with session_scope(settings) as session:
                # Wait for locks rather than abort: a worker may still be finishing the
                # previous test's work (TRUNCATE takes its locks table by table).
                session.execute(text("SET LOCAL deadlock_timeout = '5s'"))
                session.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
            break
        except DBAPIError as exc:
            if "deadlock" not in str(exc) or attempt == 4:
                raise
            time.sleep(0.2)
    yield settings


@pytest.fixture(scope="session")
def worker(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    """One worker shared by the pipeline tests of this run."""
    w = Worker(settings, tmp_path_factory.mktemp("worker")).start()
    yield w
    w.stop()


@pytest.fixture
def client(settings: Settings, db: Settings) -> Iterator[LedgerClient]:
    with LedgerClient(settings) as c:
        yield c


@pytest.fixture(autouse=True, scope="session")
def _no_user_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Tests never start servers in the user's own data directory."""
    home = Path(tmp_path_factory.mktemp("default-home"))
    previous = os.environ.get("TOKENLEDGER_HOME")
    os.environ["TOKENLEDGER_HOME"] = str(home)
    yield
    from tokenledger.db import embedded as embedded_pg
    from tokenledger.queue import embedded as embedded_redis

    embedded_redis.stop(home)  # whatever a test started there (settings left unset)
    embedded_pg.stop(home)
    if previous is None:
        os.environ.pop("TOKENLEDGER_HOME", None)
    else:
        os.environ["TOKENLEDGER_HOME"] = previous
