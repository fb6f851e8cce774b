"""The embedded default: SQLite ledger and a broker on a local file, nothing running."""

from __future__ import annotations

import pytest

from tests.conftest import Worker, assert_verified, wait_for
from tokenledger import LedgerClient, Settings
from tokenledger.db import dispose_engines
from tokenledger.migrate import migrate


@pytest.fixture
def embedded(tmp_path):
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'ledger.sqlite'}",
                        broker_url=f"sqla+sqlite:///{tmp_path / 'broker.sqlite'}",
                        queue="tokenledger", retry_backoff_max=1)
    migrate(settings.database_url)
    worker = Worker(settings, tmp_path).start()
    yield settings
    worker.stop()
    dispose_engines(close=True)


def test_defaults_need_no_servers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("DATABASE_URL", "BROKER_URL"):
        monkeypatch.delenv(f"TOKENLEDGER_{name}", raising=False)
    s = Settings()
    assert s.is_sqlite and s.embedded_broker
    assert str(tmp_path) in s.database_url and str(tmp_path) in s.broker_url


def test_the_pipeline_runs_on_sqlite_and_the_embedded_broker(embedded):
    with LedgerClient(embedded) as client:
        client.open_account("ann")
        client.open_account("bob", plan="Gift")
        charge = client.charge("bob", feature="image_generation")
        credit = client.credit("ann", 10, reason="bonus")
        assert client.result(credit, timeout=60).status == "applied"
        keys = [charge, credit, client.charge("ann", amount=12), client.charge("ann", amount=50)]
        client.publish({"type": "charge", "key": charge, "user_id": "bob",
                        "feature": "image_generation"})  # a duplicate delivery
        client._publish({"type": "charge", "key": "bad", "user_id": "ann", "amount": 0})
        results = wait_for(client, keys, timeout=60)
        assert [results[k].status for k in keys] == ["applied", "applied", "applied",
                                                       "declined"]
        refund = client.refund("bob", charge, reason="operation_failed")
        assert client.result(refund, timeout=60).data["refunded"] == 10
        assert client.result("bad", timeout=60).status == "dead_lettered"
        assert client.balance("ann").balance == 3
        assert client.balance("bob").balance == 100
    assert_verified(embedded.database_url)


def _declare(url: str, barrier, queue: str) -> None:
    from kombu import Connection

    import tokenledger.broker  # noqa: F401  (registers the embedded transport)

    with Connection(url) as conn:
        channel = conn.default_channel
        barrier.wait()
        channel._get_or_create(queue)


def test_processes_declaring_one_queue_at_once_all_succeed(tmp_path):
    """A worker and its embedded beat declare the demo's queue at the same instant; kombu
    guards that only within a process, so one of them used to die on the UNIQUE name."""
    import multiprocessing

    from kombu import Connection

    import tokenledger.broker  # noqa: F401

    ctx = multiprocessing.get_context("fork")
    for attempt in range(3):
        url = f"sqla+sqlite:///{tmp_path}/broker-{attempt}.sqlite"
        with Connection(url) as conn:
            conn.default_channel._get_or_create("warmup")  # the tables exist, as in the demo
        barrier = ctx.Barrier(4)
        procs = [ctx.Process(target=_declare, args=(url, barrier, "tokenledger"))
                 for _ in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert [p.exitcode for p in procs] == [0, 0, 0, 0]
