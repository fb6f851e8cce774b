"""RabbitMQ as the production broker: quorum queues, publisher confirms, and a worker
killed with ``kill -9`` whose unacknowledged messages the broker hands to the next one."""

from __future__ import annotations

import os
import pickle
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from kombu import Connection, Queue
from sqlalchemy import text

from tests.support import (
    IN_CI,
    Worker,
    apply,
    assert_verified,
    balances_by_user,
    session_scope,
    wait_for,
)
from tokenledger import LedgerClient
from tokenledger.queue.names import APPLY_EVENTS

pytestmark = pytest.mark.services

AMQP_URL = os.environ.get("TOKENLEDGER_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672//")


@pytest.fixture
def rabbit(settings, db):
    try:
        with Connection(AMQP_URL, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:  # noqa: BLE001 - any failure to reach it
        if IN_CI:
            pytest.fail(f"RabbitMQ is not reachable ({exc}): it must run in CI",
                        pytrace=False)
        pytest.skip(f"RabbitMQ is not reachable ({exc})")
    own = settings.model_copy(update={"broker_url": AMQP_URL,
                                      "queue": f"tlrabbit-{uuid.uuid4().hex[:8]}"})
    yield own
    with Connection(AMQP_URL) as conn:
        conn.default_channel.queue_delete(own.queue)


def test_events_flow_over_a_quorum_queue_and_it_is_one(rabbit, tmp_path):
    users = [f"r{i}" for i in range(20)]
    apply(rabbit, *({"type": "open_account", "key": f"o-{u}", "user_id": u,
                     "plan": "Business"} for u in users))
    worker = Worker(rabbit, tmp_path).start()
    try:
        with LedgerClient(rabbit) as client:
            with ThreadPoolExecutor(8) as pool:
                singles = list(pool.map(lambda n: client.charge(users[n % 20], amount=1),
                                        range(400)))
            batch = client.publish_many({"type": "charge", "user_id": users[n % 20],
                                         "amount": 2} for n in range(600))
            # A message of another serializer on the queue: dead-lettered, not dropped.
            with Connection(AMQP_URL) as conn:
                conn.Producer().publish(
                    pickle.dumps([[{"type": "charge"}], {}, {}]), routing_key=rabbit.queue,
                    content_type="application/x-python-serialize", content_encoding="binary",
                    headers={"task": APPLY_EVENTS, "id": "pickled"})
            results = wait_for(client, singles + batch, timeout=120)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                with session_scope(rabbit) as s:
                    reasons = list(s.scalars(text("SELECT reason FROM dead_letters")))
                if reasons:
                    break
                time.sleep(0.1)
    finally:
        worker.stop()
    assert {r.status for r in results.values()} == {"applied"}
    assert len(reasons) == 1 and "'application/x-python-serialize' refused" in reasons[0], \
        reasons
    assert balances_by_user(rabbit) == {u: 10000 - 20 - 60 for u in users}
    assert_verified(rabbit)
    # The queue is a quorum queue: declaring it as a classic one is refused.
    with Connection(AMQP_URL) as conn, pytest.raises(Exception, match="PRECONDITION|406"):
        Queue(rabbit.queue, routing_key=rabbit.queue, durable=True,
              queue_arguments={"x-queue-type": "classic"})(conn.default_channel).declare()


@pytest.mark.slow
def test_a_worker_killed_with_kill_9_loses_nothing_on_rabbitmq(rabbit, tmp_path):
    users = [f"k{i}" for i in range(50)]
    apply(rabbit, *({"type": "open_account", "key": f"o-{u}", "user_id": u,
                     "plan": "Business"} for u in users))
    worker = Worker(rabbit, tmp_path).start()
    kills = 0
    try:
        with LedgerClient(rabbit) as client:
            keys: list[str] = []
            with ThreadPoolExecutor(8) as pool:
                for round_ in range(4):
                    keys += pool.map(lambda n: client.charge(users[n % 50], amount=1),
                                     range(round_ * 500, (round_ + 1) * 500))
                    time.sleep(0.3)
                    worker.kill(9)
                    kills += 1
                    worker = Worker(rabbit, tmp_path).start()
            results = wait_for(client, keys, timeout=180)
    finally:
        worker.stop()
    assert kills == 4
    assert {r.status for r in results.values()} == {"applied"}
    with session_scope(rabbit) as s:
        charges = s.scalar(text("SELECT count(*) FROM ledger_entries WHERE type = 'CHARGE'"))
    assert charges == len(keys) == 2000
    assert balances_by_user(rabbit) == {u: 10000 - 40 for u in users}
    assert_verified(rabbit)
