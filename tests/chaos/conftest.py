"""Fixtures of the chaos suite: private servers per scenario, a paced producer, a model of
the expected ledger, and the figures printed at the end of the run."""

from __future__ import annotations

import os
import random
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from tests.chaos.servers import PrivatePostgres, PrivateRedis
from tests.support import IN_CI, apply, assert_verified, session_scope
from tokenledger import LedgerClient, Settings
from tokenledger.db.engine import dispose_engines
from tokenledger.db.migrate import migrate
from tokenledger.errors import TokenLedgerError

FIGURES: list[dict[str, Any]] = []
START_BALANCE = 10_000  # the Business plan's grant


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not FIGURES:
        return
    terminalreporter.section("chaos figures")
    for f in FIGURES:
        terminalreporter.write_line(", ".join(f"{k}={v}" for k, v in f.items()))


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[tuple[PrivatePostgres, PrivateRedis]]:
    """A private PostgreSQL (migrated ``tokenledger`` database) and Redis for one scenario."""
    try:
        pg = PrivatePostgres().init()
    except Exception as exc:  # noqa: BLE001 - reported as a skip off CI
        if IN_CI:
            raise
        pytest.skip(f"cannot start a private PostgreSQL: {exc}")
    rd = PrivateRedis(tmp_path).start()
    try:
        yield pg, rd
    finally:
        dispose_engines(close=True)
        rd.stop()
        pg.remove()


@pytest.fixture
def chaos(servers: tuple[PrivatePostgres, PrivateRedis], tmp_path: Path) -> Settings:
    pg, rd = servers
    url = pg.create_database("tokenledger")
    migrate(url)
    return Settings(database_url=url, broker_url=rd.url, queue=f"chaos-{uuid.uuid4().hex[:6]}",
                    visibility_timeout=10, retry_backoff_max=2, max_retries=3,
                    home=tmp_path / "home")


def open_users(settings: Settings, n: int) -> list[str]:
    users = [f"u{i:03d}" for i in range(n)]
    apply(settings, *({"type": "open_account", "key": f"o-{u}", "user_id": u,
                       "plan": "Business"} for u in users))
    return users


@dataclass
class Stream:
    """Single-event charges of 1 from ``threads`` producer threads, paced to ``rate``
    events a second; a publish that fails (the broker is away) is tried again with the
    same key until the broker accepts it. ``accepted`` is the model: key -> user."""

    settings: Settings
    users: list[str]
    events: int
    rate: float = 400
    threads: int = 8
    accepted: dict[str, str] = field(default_factory=dict)
    publish_failures: int = 0
    done: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Stream:
        self.client = LedgerClient(self.settings)
        self._workers = [threading.Thread(target=self._run, args=(i,), daemon=True)
                         for i in range(self.threads)]
        for t in self._workers:
            t.start()
        threading.Thread(target=self._join, daemon=True).start()
        return self

    def _join(self) -> None:
        for t in self._workers:
            t.join()
        self.done.set()

    def _run(self, index: int) -> None:
        rng = random.Random(index)
        gap = self.threads / self.rate
        for n in range(index, self.events, self.threads):
            key = f"ev-{n}"
            user = self.users[rng.randrange(len(self.users))]
            while True:
                try:
                    self.client.charge(user, amount=1, key=key)
                    break
                except TokenLedgerError:
                    with self._lock:
                        self.publish_failures += 1
                    time.sleep(0.2)
            with self._lock:
                self.accepted[key] = user
            time.sleep(gap)

    def wait(self, timeout: float = 300) -> None:
        assert self.done.wait(timeout), "the producers did not finish"
        self.client.close()


def settle(settings: Settings, stream: Stream, timeout: float, figures: dict[str, Any]
           ) -> None:
    """Wait until every accepted event is final; then check the model: nothing lost,
    nothing applied twice, balances as the model says, ``verify`` clean. Records the
    figures (recovery = seconds from the end of the faults to the last event final)."""
    keys = list(stream.accepted)
    started = time.monotonic()
    deadline = started + timeout
    while True:
        with session_scope(settings) as s:
            final = s.scalar(text("SELECT count(*) FROM event_outcomes WHERE key = ANY(:k)"),
                             {"k": keys})
        if final == len(keys) or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    recovery = time.monotonic() - started
    with session_scope(settings) as s:
        doubled = s.scalar(text(
            "SELECT count(*) FROM (SELECT event_key FROM ledger_entries"
            " WHERE event_key = ANY(:k) GROUP BY event_key HAVING count(*) > 1) d"),
            {"k": keys})
        outcomes = dict(s.execute(text(
            "SELECT outcome, count(*) FROM event_outcomes WHERE key = ANY(:k)"
            " GROUP BY outcome"), {"k": keys}).all())
        balances = dict(s.execute(text(
            "SELECT a.user_id, sum(w.balance) FROM accounts a JOIN wallets w"
            " ON w.account_id = a.id GROUP BY a.user_id")).all())
    expected = {u: START_BALANCE for u in stream.users}
    for user in stream.accepted.values():
        expected[user] -= 1
    figures.update(events=len(keys), lost=len(keys) - final, doubled=doubled,
                   publish_retries=stream.publish_failures,
                   recovery_seconds=round(recovery, 1))
    FIGURES.append(figures)
    assert final == len(keys), f"{len(keys) - final} accepted event(s) never final: {figures}"
    assert doubled == 0, figures
    assert outcomes == {"applied": len(keys)}, outcomes
    assert balances == expected
    assert_verified(settings)


def chaos_events(default: int) -> int:
    return int(os.environ.get("TOKENLEDGER_CHAOS_EVENTS", default))
