"""The pipeline end to end: SDK → Redis → a real Celery worker → PostgreSQL."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import func, select, text

from tests.support import Worker, apply, assert_verified, balances_by_user, session_scope, wait_for
from tokenledger import LedgerClient
from tokenledger.ledger.models import EventOutcome, LedgerEntry
from tokenledger.queue.models import DeadLetter

pytestmark = pytest.mark.services


def test_events_flow_through_the_worker_and_balances_add_up(worker, client):
    client.open_account("alice")
    bought = client.credit("alice", 20, reason="purchase")
    spent = client.charge("alice", feature="project_creation")
    big = client.charge("alice", amount=24, metadata={"projectId": "p-1"})
    results = wait_for(client, [bought, spent, big])
    assert [results[k].status for k in (bought, spent, big)] == ["applied", "applied", "applied"]
    assert client.balance("alice").balance == 0  # 5 + 20 - 1 - 24, in whatever order
    refund = client.refund("alice", big, reason="operation_failed")
    assert client.result(refund, timeout=30).data["refunded"] == 24
    assert client.balance("alice").balance == 24
    assert_verified(client.settings)


def test_publish_many_splits_into_messages_of_at_most_1000(worker, client):
    client.open_account("bulk", plan="Business")
    keys = client.publish_many({"type": "charge", "user_id": "bulk", "amount": 1}
                               for _ in range(2500))
    results = wait_for(client, keys, timeout=120)
    assert {r.status for r in results.values()} == {"applied"}
    assert client.balance("bulk").balance == 10000 - 2500
    assert_verified(client.settings)


def test_200_concurrent_charges_of_10_on_1000_apply_exactly_100(worker, client):
    client.open_account("race")
    apply(client.settings,
          {"type": "credit", "key": "topup", "user_id": "race", "amount": 995})
    assert client.balance("race").balance == 1000

    def one(_: int) -> str:
        return client.charge("race", amount=10)  # each its own message

    with ThreadPoolExecutor(20) as pool:
        keys = list(pool.map(one, range(200)))
    statuses = [r.status for r in wait_for(client, keys, timeout=120).values()]
    assert statuses.count("applied") == 100
    assert statuses.count("declined") == 100
    assert client.balance("race").balance == 0
    assert_verified(client.settings)


def test_200_concurrent_transactions_on_one_account_never_overspend(db):
    """Without the broker: 200 threads, 200 transactions racing for one account's lock."""
    apply(db, {"type": "open_account", "key": "o", "user_id": "race"},
          {"type": "credit", "key": "topup", "user_id": "race", "amount": 995})
    barrier = threading.Barrier(50)

    def one(i: int) -> str:
        if i < 50:
            barrier.wait()
        return apply(db, {"type": "charge", "key": f"c{i}", "user_id": "race",
                          "amount": 10}).results[0].status

    with ThreadPoolExecutor(50) as pool:
        statuses = list(pool.map(one, range(200)))
    assert statuses.count("applied") == 100 and statuses.count("declined") == 100
    assert_verified(db)


def test_duplicate_and_conflicting_deliveries_apply_once(worker, client):
    client.open_account("dup")
    event = {"type": "charge", "key": "order-42", "user_id": "dup", "amount": 2}
    for _ in range(5):
        client.publish(event)
    client.publish_many([event, event])
    client.publish({**event, "amount": 3})  # same key, different payload
    time.sleep(0.5)
    # This client's last publish of the key was the conflicting one: that is its answer.
    mine = client.result("order-42", timeout=30)
    assert mine.status == "conflict" and mine.stored.status == "applied"
    url = client.settings
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with session_scope(url) as s:
            conflicts = s.scalar(text("SELECT count(*) FROM event_conflicts"))
        if conflicts:
            break
        time.sleep(0.1)
    assert conflicts == 1
    assert client.balance("dup").balance == 3
    with session_scope(url) as s:
        assert s.scalar(select(func.count()).select_from(LedgerEntry)
                        .where(LedgerEntry.event_key == "order-42")) == 1
    assert_verified(url)


def test_a_poison_message_is_dead_lettered_while_good_ones_keep_flowing(worker, client):
    client.open_account("good")
    publish = client.producer.publish_events
    publish("not an event at all")
    publish([{"type": "charge", "key": "bad-1", "user_id": "good", "amount": -5},
             {"type": "charge", "key": "ok-1", "user_id": "good", "amount": 1},
             {"type": "teleport", "key": "bad-2"},
             {"type": "charge", "key": "ghost-1", "user_id": "nobody", "amount": 1}])
    publish([])
    publish({"type": "charge", "key": "k" * 300, "user_id": "good", "amount": 1})
    good = [client.charge("good", amount=1) for _ in range(3)]
    results = wait_for(client, ["ok-1", *good])
    assert {r.status for r in results.values()} == {"applied"}
    assert client.result("ghost-1", timeout=30).status == "dead_lettered"
    url = client.settings
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with session_scope(url) as s:
            reasons = sorted(s.scalars(select(DeadLetter.reason)))
        if len(reasons) >= 6:
            break
        time.sleep(0.1)
    assert len(reasons) == 6, reasons
    joined = " | ".join(reasons)
    for expected in ("amount: Input should be greater than 0", "type: Input tag 'teleport'",
                     "account not found", "batch: must hold at least one event",
                     "message: expected an event object or a list",
                     "key: String should have at most 255 characters"):
        assert expected in joined
    assert worker.proc.poll() is None, "the worker must survive poison messages"
    assert client.balance("good").balance == 1


def test_dead_letters_for_unknown_accounts_can_be_retried_after_opening(worker, client):
    key = client.charge("late", amount=2)
    assert client.result(key, timeout=30).status == "dead_lettered"
    client.open_account("late")
    from tokenledger.queue.deadletters import payload_of, select_ids
    with session_scope(client.settings) as s:
        for letter in select_ids(s, None):
            client.producer.publish_events(payload_of(letter))
            s.delete(letter)
    deadline = time.monotonic() + 30
    while client.result(key).status != "applied" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.result(key).status == "applied"
    assert client.balance("late").balance == 3


@pytest.mark.slow
def test_a_worker_killed_mid_batch_loses_nothing_and_applies_nothing_twice(
        settings, db, tmp_path):
    crash = settings.model_copy(update={"queue": settings.queue + "-crash",
                                        "visibility_timeout": 5})
    users = [f"k{i}" for i in range(200)]
    apply(db, *({"type": "open_account", "key": f"o-{u}", "user_id": u, "plan": "Business"}
                for u in users))
    worker = Worker(crash, tmp_path, concurrency=2).start()
    events = [{"type": "charge", "key": f"ch-{n}", "user_id": users[n % 200], "amount": 1 + n % 3}
              for n in range(30_000)]
    with LedgerClient(crash) as client:
        client.publish_many(events)
        # Wait until a batch is committed and another is in flight (a transaction is open).
        deadline = time.monotonic() + 60
        in_flight = False
        while time.monotonic() < deadline and not in_flight:
            with session_scope(db) as s:
                done = s.scalar(select(func.count()).select_from(EventOutcome))
                in_flight = done > 0 and s.scalar(text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND pid <> pg_backend_pid() AND xact_start IS NOT NULL")) > 0
        assert in_flight, "never caught a batch in flight"
        worker.kill(9)
        with session_scope(db) as s:
            applied_at_kill = s.scalar(select(func.count()).select_from(EventOutcome))
        assert 0 < applied_at_kill < len(events)

        restarted = Worker(crash, tmp_path, concurrency=2).start()
        try:
            # The killed worker's messages come back a visibility timeout (5 s) plus one
            # restore scan (1 s here) later; kombu's default scan every 100 s missed this.
            results = wait_for(client, [e["key"] for e in events], timeout=90)
        finally:
            restarted.stop()
    assert {r.status for r in results.values()} == {"applied"}
    expected: dict[str, int] = {}
    for e in events:
        expected[e["user_id"]] = expected.get(e["user_id"], 10000) - e["amount"]
    with session_scope(db) as s:
        entries = s.scalar(select(func.count()).select_from(LedgerEntry)
                           .where(LedgerEntry.type == "CHARGE"))
    balances = balances_by_user(db)
    assert entries == len(events)
    assert balances == expected
    assert_verified(db)


@pytest.mark.slow
def test_database_connections_cut_mid_flight_lose_nothing_and_apply_nothing_twice(
        settings, db, tmp_path):
    """PostgreSQL drops every worker connection, again and again, while batches apply."""
    cut = settings.model_copy(update={"queue": settings.queue + "-cut"})
    users = [f"c{i}" for i in range(50)]
    apply(db, *({"type": "open_account", "key": f"o-{u}", "user_id": u, "plan": "Business"}
                for u in users))
    worker = Worker(cut, tmp_path, concurrency=2).start()
    events = [{"type": "charge", "key": f"cut-{n}", "user_id": users[n % 50], "amount": 1}
              for n in range(20_000)]
    killed = 0
    try:
        with LedgerClient(cut) as client:
            for start in range(0, len(events), 200):
                client.publish_many(events[start:start + 200])
            for _ in range(15):
                time.sleep(0.3)
                with session_scope(db) as s:
                    killed += s.scalar(text(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                        " WHERE datname = current_database() AND pid <> pg_backend_pid()")) or 0
            results = wait_for(client, [e["key"] for e in events], timeout=240)
    finally:
        worker.stop()
    assert killed > 0, "no worker connection was ever cut"
    log = worker.log.read_text()
    assert "database connection lost applying" in log \
        or "database unavailable applying" in log, "no transaction was cut mid-flight"
    assert {r.status for r in results.values()} == {"applied"}
    with session_scope(db) as s:
        charges = s.scalar(select(func.count()).select_from(LedgerEntry)
                           .where(LedgerEntry.type == "CHARGE"))
    balances = balances_by_user(db)
    assert charges == len(events)
    assert balances == {u: 10000 - 400 for u in users}
    assert_verified(db)
