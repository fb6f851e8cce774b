"""What the worker does with what it is handed: malformed messages, bad signatures, poison
that must not loop, repeated deliveries, the in-flight record and its reconciler, and
what a caller reads back (conflicts and replays)."""

from __future__ import annotations

import base64
import json
import pickle
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
from sqlalchemy import func, select, text

from tests.support import assert_verified, session_scope, wait_for
from tokenledger import LedgerClient
from tokenledger.queue import inflight
from tokenledger.queue import message as wire
from tokenledger.queue.models import DeadLetter
from tokenledger.queue.names import APPLY_EVENTS

pytestmark = pytest.mark.services


def _letters(settings, at_least: int, timeout: float = 30) -> list[DeadLetter]:
    deadline = time.monotonic() + timeout
    while True:
        with session_scope(settings) as s:
            letters = list(s.scalars(select(DeadLetter).order_by(DeadLetter.id)))
            for letter in letters:
                s.expunge(letter)
        if len(letters) >= at_least or time.monotonic() > deadline:
            return letters
        time.sleep(0.05)


def _push_raw(settings, **changes) -> str:
    """LPUSH a hand-made message onto the test queue, as a foreign producer could."""
    task_id, raw = wire.redis_envelope(APPLY_EVENTS, settings.queue, [{"type": "charge"}])
    message = json.loads(raw)
    headers = changes.pop("headers", None)
    if headers is not None:
        message["headers"] = headers
    if "body" in changes:
        message["body"] = base64.b64encode(changes.pop("body")).decode()
    message.update(changes)
    redis.Redis.from_url(settings.broker()).lpush(settings.queue, json.dumps(message))
    return task_id


def test_messages_that_cannot_be_executed_are_dead_lettered_with_their_raw_body(
        worker, client):
    s = client.settings
    client.open_account("steady")
    good_before = client.charge("steady", amount=1)
    _push_raw(s, body=b"\xffnot json at all")
    _push_raw(s, body=pickle.dumps([[{"type": "charge"}], {}, {}]),
              **{"content-type": "application/x-python-serialize"})
    _push_raw(s, headers={**wire.headers("evil.task", "t-unknown")})
    _push_raw(s, headers={"id": "t-noheader"})
    raw_list = redis.Redis.from_url(s.broker())
    raw_list.lpush(s.queue, "garbage{")  # not even an envelope: used to stop the worker
    raw_list.lpush(s.queue, "[1, 2]")
    good_after = client.charge("steady", amount=1)

    results = wait_for(client, [good_before, good_after])
    assert {r.status for r in results.values()} == {"applied"}
    letters = _letters(s, 6)
    reasons = [letter.reason for letter in letters]
    assert len(letters) == 6, reasons
    payloads = [json.loads(letter.payload) for letter in letters]
    assert all(p["malformed"] for p in payloads)
    joined = " | ".join(reasons)
    assert "body is not a JSON task message" in joined
    assert "'application/x-python-serialize' refused" in joined
    assert "'evil.task' does not run from the ledger queue" in joined
    assert "no task header" in joined
    assert joined.count("not a kombu message") == 2
    assert any("not json at all" in p["body"] for p in payloads)
    assert any(p["body"] == "garbage{" for p in payloads)
    assert worker.proc.poll() is None
    assert client.balance("steady").balance == 3
    assert_verified(s)


@pytest.mark.parametrize("args, kwargs", [
    ([], {}),
    ([[{"type": "charge"}], "extra"], {}),
    ([[]], {"unknown": 1}),
    ([[]], {"deferrals": "many"}),
])
def test_a_bad_signature_is_dead_lettered_at_once_never_requeued(worker, client, args,
                                                                 kwargs):
    client.open_account("sig")
    client.producer.send(APPLY_EVENTS, args, kwargs)
    follow = client.charge("sig", amount=1)
    assert client.result(follow, timeout=30).status == "applied"
    letters = _letters(client.settings, 1)
    assert len(letters) == 1 and "bad signature" in letters[0].reason
    assert letters[0].attempts == 1  # no requeue cycles: refused on the first delivery


@pytest.mark.parametrize("field, value", [
    ("key", "nul\x00key"), ("user_id", "us\x00er"), ("amount", 2**63),
    ("amount", -(2**63) - 1), ("metadata", {"note": "a\x00b"}),
    ("expires_at", "0001-01-01T00:00:00Z"), ("key", "k" * 256),
])
def test_what_postgresql_cannot_store_is_refused_by_name_and_neighbours_flow(
        worker, client, field, value):
    client.open_account("store")
    started = time.monotonic()
    bad = {"type": "credit" if field == "expires_at" else "charge",
           "key": f"bad-{uuid.uuid4().hex[:6]}", "user_id": "store", "amount": 1, field: value}
    good = [{"type": "charge", "key": f"n-{i}-{uuid.uuid4().hex[:6]}", "user_id": "store",
             "amount": 1} for i in range(4)]
    client.producer.publish_events([good[0], good[1], bad, good[2], good[3]])
    results = wait_for(client, [g["key"] for g in good], timeout=30)
    assert {r.status for r in results.values()} == {"applied"}
    assert time.monotonic() - started < 10, "neighbours waited on a poison event"
    letters = _letters(client.settings, 1)
    assert len(letters) == 1 and letters[0].reason.startswith(f"{field}:"), \
        [x.reason for x in letters]
    assert client.balance("store").balance == 1
    assert_verified(client.settings)


def test_a_message_delivered_too_often_goes_to_the_dead_letter_store_whole(worker, client):
    s = client.settings
    client.open_account("often")
    record = inflight.record_for(s)
    events = [{"type": "charge", "key": f"of-{i}", "user_id": "often", "amount": 1}
              for i in range(3)]
    # As if five workers had died holding it: the next delivery is the sixth.
    task_id, raw = wire.redis_envelope(APPLY_EVENTS, s.queue, [events])
    record.client.hset(record.names.attempts, task_id, inflight.MAX_DELIVERIES)
    record.publish(task_id, raw, [e["key"] for e in events])
    letters = _letters(s, 1)
    assert len(letters) == 1 and "delivered 6 times" in letters[0].reason
    assert json.loads(letters[0].payload) == events  # its events, so `dlq retry` works
    assert not record.pending("of-0")
    assert client.balance("often").balance == 5


def test_a_message_taken_by_kombu_and_lost_with_its_worker_is_queued_again(worker, client):
    """The kombu window (``<queue>.tasks``, consumed by Celery's Redis transport): a message
    popped from the queue but never recorded as unacked (the worker died in between) is
    found by the reconciler and applied exactly once."""
    s = client.settings
    client.open_account("lost")
    record = inflight.record_for(s, s.tasks_queue)
    event = {"type": "charge", "key": f"lost-{uuid.uuid4().hex[:6]}", "user_id": "lost",
             "amount": 2}
    task_id, raw = wire.redis_envelope(APPLY_EVENTS, s.tasks_queue, [event])
    # Recorded, then taken by a "worker" that dies before kombu's unacked bookkeeping.
    n = record.names
    pipe = record.client.pipeline()
    pipe.hset(n.message, task_id, raw)
    pipe.zadd(n.inflight, {task_id: 0})  # accepted long ago
    pipe.hset(n.keys, event["key"], task_id)
    pipe.execute()
    assert record.pending(event["key"])
    # Newer work is taken from that queue meanwhile, so the record knows the lost one left.
    newer = {"type": "charge", "key": f"newer-{uuid.uuid4().hex[:6]}", "user_id": "lost",
             "amount": 1}
    client.producer.send(APPLY_EVENTS, [newer], queue=s.tasks_queue)
    assert client.result(newer["key"], timeout=30).status == "applied"

    def final(keys):
        with session_scope(s) as session:
            return set(session.scalars(text(
                "SELECT key FROM event_outcomes WHERE key = ANY(:k)"), {"k": keys}))

    record.client.delete(f"{n.inflight}:reconciling")
    report = inflight.reconcile(record, final, stale_after=0)
    assert report.requeued == 1, report
    assert client.result(event["key"], timeout=30).status == "applied"
    record.client.delete(f"{n.inflight}:reconciling")
    again = inflight.reconcile(record, final, stale_after=0)
    assert again.requeued == 0
    deadline = time.monotonic() + 10
    while record.pending(event["key"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not record.pending(event["key"])
    assert client.balance("lost").balance == 2
    with session_scope(s) as session:
        assert session.scalar(text("SELECT count(*) FROM ledger_entries"
                                   " WHERE event_key = :k"), {"k": event["key"]}) == 1


def test_a_publish_is_recorded_until_its_event_is_final(worker, client):
    client.open_account("rec")
    record = inflight.record_for(client.settings)
    before = record.size()
    key = client.charge("rec", amount=1)
    assert client.result(key, timeout=30).status == "applied"
    deadline = time.monotonic() + 10
    while record.pending(key) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not record.pending(key)
    assert record.size() <= before


def test_a_refund_waiting_for_its_charge_stays_pending_then_applies(worker, client):
    """A refund that arrives before its charge is published again later, with a delay;
    meanwhile its key is still pending (never "unknown"), and it applies once the charge
    is there."""
    client.open_account("early")
    record = inflight.record_for(client.settings)
    charge_key = f"late-charge-{uuid.uuid4().hex[:6]}"
    refund = client.refund("early", charge_key, amount=1)
    deadline = time.monotonic() + 20
    while record.client.hexists(record.names.keys, refund) and time.monotonic() < deadline:
        time.sleep(0.02)  # the first attempt deferred it and cleared its message
    assert record.client.exists(record.deferred(refund))
    assert record.pending(refund)
    client.charge("early", amount=2, key=charge_key)
    # Published again after 1 s (then 2, 4, ...): well before the visibility timeout (30 s
    # here) could bring the deferred message back by redelivery.
    assert client.result(refund, timeout=15).status == "applied"
    assert client.balance("early").balance == 5 - 2 + 1
    assert_verified(client.settings)


def test_the_caller_reads_conflict_and_replay_for_its_own_publish(worker, client):
    client.open_account("truth")
    first = client.charge("truth", amount=2, key="truth-1")
    assert client.result(first, timeout=30).status == "applied"
    assert client.result(first).replay is False

    client.charge("truth", amount=2, key="truth-1")  # the same event again: a replay
    time.sleep(0.3)
    replay = client.result("truth-1", timeout=30)
    assert replay.status == "applied" and replay.replay is True

    client.charge("truth", amount=3, key="truth-1")  # another payload: a conflict
    conflict = client.result("truth-1", timeout=30)
    assert conflict.status == "conflict"
    assert conflict.stored is not None and conflict.stored.status == "applied"
    assert "another payload" in (conflict.reason or "")
    with LedgerClient(client.settings) as other:  # a client that did not publish it
        assert other.result("truth-1").status == "applied"
    assert client.balance("truth").balance == 3


def test_threads_publishing_together_share_messages_and_each_returns_once_queued(
        worker, client):
    client.open_account("group", plan="Business")
    barrier = threading.Barrier(16)

    def one(_: int) -> str:
        barrier.wait()
        return client.charge("group", amount=1)

    with ThreadPoolExecutor(16) as pool:
        keys = list(pool.map(one, range(64)))
    messages = {client._sent[k][1] for k in keys}
    assert len(messages) < len(keys), "concurrent publishes never shared a message"
    results = wait_for(client, keys)
    assert {r.status for r in results.values()} == {"applied"}
    assert client.balance("group").balance == 10000 - 64


def test_linger_packs_publishes_and_flush_waits_for_the_broker(worker, client):
    client.open_account("linger", plan="Business")
    with LedgerClient(client.settings, linger_ms=50) as lingering:
        keys = [lingering.charge("linger", amount=1) for _ in range(20)]
        lingering.flush(timeout=10)
        record = inflight.record_for(client.settings)
        assert all(record.pending(k) or lingering.result(k).status == "applied"
                   for k in keys)
    results = wait_for(client, keys)
    assert {r.status for r in results.values()} == {"applied"}
    with session_scope(client.settings) as s:
        messages = s.scalar(select(func.count(func.distinct(text("message_id"))))
                            .select_from(text("event_outcomes"))
                            .where(text("key = ANY(:k)")), {"k": keys})
    assert messages < 20


def test_messages_a_killed_worker_held_go_back_to_the_queue_and_apply_once(worker, client):
    """The intake: what a worker took sits in its own hash until committed; when its
    heartbeat expires (killed, even kill -9) the reconciler gives them back."""
    from tokenledger.queue import intake

    s = client.settings
    client.open_account("rescued")
    names = intake.Names(s.queue)
    rd = redis.Redis.from_url(s.broker())
    events = [{"type": "charge", "key": f"held-{i}-{uuid.uuid4().hex[:6]}",
               "user_id": "rescued", "amount": 1} for i in range(3)]
    taken = {}
    for e in events:
        task_id, raw = wire.redis_envelope(APPLY_EVENTS, s.queue, [e])
        taken[task_id] = raw
    ghost = "ghost-worker"
    rd.hset(names.taken(ghost), mapping=taken)  # taken, and never acknowledged
    rd.sadd(names.workers, ghost)  # and no heartbeat: that worker is gone
    moved = intake.rescue_dead_workers(rd, s.queue)
    assert moved == 3
    results = wait_for(client, [e["key"] for e in events])
    assert {r.status for r in results.values()} == {"applied"}
    assert not rd.exists(names.taken(ghost)) and not rd.sismember(names.workers, ghost)
    assert intake.rescue_dead_workers(rd, s.queue) == 0
    assert client.balance("rescued").balance == 2
