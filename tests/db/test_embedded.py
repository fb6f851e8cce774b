"""The embedded default: a private PostgreSQL and Redis in one data directory, started on
first use, reused by later processes, stopped by `tokenledger embedded stop`."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest

from tests.support import run_cli
from tokenledger import Settings
from tokenledger.db import embedded as pg
from tokenledger.queue import embedded as broker


def test_defaults_need_no_servers_and_never_use_the_working_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("DATABASE_URL", "BROKER_URL", "HOME"):
        monkeypatch.delenv(f"TOKENLEDGER_{name}", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    s = Settings()
    assert s.embedded_database and s.embedded_broker
    assert s.home == tmp_path / "xdg" / "tokenledger"
    assert list(tmp_path.iterdir()) == []  # nothing started, nothing written


@pytest.fixture
def home(tmp_path: Path):
    yield tmp_path / "home"
    pg.stop(tmp_path / "home")
    broker.stop(tmp_path / "home")


def test_first_use_starts_migrates_and_later_processes_reuse(home: Path) -> None:
    s = Settings(home=home)
    started = time.monotonic()
    url = s.ledger_url()
    first = time.monotonic() - started
    assert url.startswith("postgresql+psycopg://postgres@/tokenledger?host=")
    with psycopg.connect(url.replace("+psycopg", "")) as conn:
        assert conn.execute("SELECT count(*) FROM plans").fetchone()[0] == 4  # migrated
    broker_url = s.broker()
    assert broker_url.startswith("redis+socket://") and pg.running(home)
    # Another process finds the running servers in a few milliseconds.
    probe = ("import time; from tokenledger import Settings; from pathlib import Path;"
             f"s = Settings(home=Path({str(home)!r})); t = time.monotonic();"
             "u = s.ledger_url(); b = s.broker(); print(u, b, time.monotonic() - t)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()
    assert out[:2] == [url, broker_url]
    assert float(out[2]) < max(1.0, first)
    assert broker.running(home)


def test_embedded_status_and_stop(home: Path) -> None:
    s = Settings(home=home)
    s.ledger_url()
    s.broker()
    status = run_cli(s.model_copy(update={"database_url": None, "broker_url": None}),
                     "embedded", "status", "--json", TOKENLEDGER_HOME=str(home))
    assert status.exit_code == 0, status.stderr
    assert '"postgresql": true' in status.stdout and '"redis": true' in status.stdout
    stopped = run_cli(s, "embedded", "stop", TOKENLEDGER_HOME=str(home))
    assert stopped.exit_code == 0 and "postgresql, redis" in stopped.stdout
    assert not pg.running(home) and not broker.running(home)
    assert (home / "pgdata" / "PG_VERSION").exists()  # the data stays


@pytest.mark.slow
def test_kill_9_of_a_worker_on_the_embedded_servers_loses_nothing(
        home: Path, tmp_path: Path) -> None:
    """What a `kill -9` of the demo's worker costs on the embedded default: its taken
    messages sit in the embedded Redis until the next worker gives them back, so nothing
    is lost and nothing applies twice; only the wait grows (by the heartbeat bound)."""
    from tests.support import Worker, assert_verified, wait_for
    from tokenledger import LedgerClient

    s = Settings(home=home, queue=f"embedded-kill-{time.monotonic_ns()}")
    first = Worker(s, tmp_path).start()
    client = LedgerClient(s)
    try:
        client.open_account("victim", plan="Business")
        opening = client.balance("victim").balance
        keys = [f"kill-{i}" for i in range(8000)]
        publisher = threading.Thread(target=lambda: [
            client.charge("victim", amount=1, key=k) for k in keys])
        publisher.start()  # the worker dies while events are still arriving
        deadline = time.monotonic() + 60
        while client.balance("victim").balance > opening - 100:  # mid-stream
            assert time.monotonic() < deadline, "the worker applied nothing"
            time.sleep(0.01)
        first.kill(9)
        killed_at = time.monotonic()
        applied_at_kill = opening - client.balance("victim").balance
        publisher.join(timeout=120)
        second = Worker(s, tmp_path).start()
        try:
            results = wait_for(client, keys, timeout=120)
        finally:
            second.stop()
        recovery = time.monotonic() - killed_at
        assert {r.status for r in results.values()} == {"applied"}  # none lost
        assert client.balance("victim").balance == opening - 8000  # none twice
        assert_verified(s)
        print(f"\nembedded kill -9: {applied_at_kill} of 8,000 applied at the kill; lost 0, "
              f"doubled 0; all final {recovery:.1f} s after the kill")
    finally:
        client.close()
        first.stop()
