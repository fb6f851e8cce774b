"""Metrics move when a real worker applies events; scrape-time gauges read the real state."""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from tests.support import Worker, apply, session_scope, wait_for
from tokenledger import LedgerClient, Settings
from tokenledger.ops import metrics
from tokenledger.queue.deadletters import record as record_dead_letter
from tokenledger.queue.names import APPLY_EVENTS
from tokenledger.timeutil import utcnow

pytestmark = pytest.mark.services

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape(port: int) -> Samples:
    return parse(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="module")
def metered(settings: Settings, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[tuple[Settings, int]]:
    """A worker with two pool processes serving metrics, on a queue of its own."""
    own = settings.model_copy(update={"queue": f"{settings.queue}-metrics"})
    port = free_port()
    w = Worker(own, tmp_path_factory.mktemp("metered"), concurrency=2,
               extra_env={"TOKENLEDGER_METRICS_PORT": str(port)}).start()
    yield own, port
    w.stop()


def test_worker_metrics_move_when_events_are_applied(metered, db):
    own, port = metered
    before = scrape(port)
    user = f"m-{uuid.uuid4().hex[:8]}"
    with LedgerClient(own) as client:
        client.open_account(user)  # synchronous: not a worker event
        charged = client.charge(user, feature="project_creation")
        declined = client.charge(user, amount=1000)
        credited = client.credit(user, 10)
        results = wait_for(client, [charged, declined, credited])
        assert [results[k].status for k in (charged, declined, credited)] == [
            "applied", "declined", "applied"]
        again = client.publish({"type": "charge", "key": charged, "user_id": user,
                                "feature": "project_creation"})
        assert again == charged
        # A malformed event.
        client.producer.send(APPLY_EVENTS, [{"type": "charge", "v": 1}], queue=own.queue)

        expected = {
            ("tokenledger_events_total", "applied", "charge", "project_creation"): 1,
            ("tokenledger_events_total", "declined", "charge", "none"): 1,
            ("tokenledger_events_total", "applied", "credit", "none"): 1,
            ("tokenledger_events_total", "duplicate", "charge", "project_creation"): 1,
            ("tokenledger_events_total", "dead_lettered", "invalid", "other"): 1,
        }

        def delta(after: Samples, name: str, outcome: str, type_: str, feature: str) -> float:
            labels = {"outcome": outcome, "type": type_, "feature": feature}
            return value(after, name, **labels) - value(before, name, **labels)

        deadline = time.monotonic() + 30
        while True:
            after = scrape(port)
            moved = {k: delta(after, *k) for k in expected}
            if moved == expected or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    assert moved == expected

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("tokenledger_credits_charged_total", feature="project_creation") == 1
    assert grew("tokenledger_credits_granted_total", source="credit") == 10
    # Five messages of one event each, applied in one to five groups (a worker applies
    # the messages it holds together).
    groups = grew("tokenledger_apply_batch_size_count")
    assert 1 <= groups <= 5
    assert grew("tokenledger_apply_batch_size_sum") == 5
    assert grew("tokenledger_apply_duration_seconds_count") == groups
    assert grew("tokenledger_publish_to_commit_seconds_count") == groups
    assert 0 < grew("tokenledger_publish_to_commit_seconds_sum") < 30


def test_scrape_time_gauges_read_the_dlq_the_queue_and_holds(settings, db):
    idle = settings.model_copy(update={"queue": f"{settings.queue}-idle-{uuid.uuid4().hex[:6]}"})
    with session_scope(db) as session:
        for i in range(3):
            record_dead_letter(session, {"junk": i}, "test", utcnow())
    with LedgerClient(idle) as client:  # no worker consumes this queue
        for _ in range(4):
            client.publish({"type": "charge", "user_id": "nobody", "amount": 1})
    try:
        body, content_type = metrics.render(idle)
        samples = parse(body.decode())
        assert content_type.startswith("text/plain")
        assert value(samples, "tokenledger_dlq_depth") == 3
        assert value(samples, "tokenledger_queue_backlog", queue=idle.queue) == 4
        assert value(samples, "tokenledger_scrape_error", source="broker") == 0
        if metrics.holds_open(idle) is not None:
            assert value(samples, "tokenledger_holds_open") == metrics.holds_open(idle)
        assert metrics.queue_depths(idle) == {idle.queue: 4, idle.tasks_queue: 0}
    finally:
        redis.Redis.from_url(idle.broker_url).delete(idle.queue)


def test_an_unreachable_source_is_reported_not_raised(settings, db):
    broken = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    samples = parse(metrics.render(broken)[0].decode())
    assert value(samples, "tokenledger_scrape_error", source="broker") == 1
    assert value(samples, "tokenledger_scrape_error", source="dlq") == 0


def test_feature_labels_stay_bounded():
    assert metrics.feature_label("image_generation", {"image_generation"}) == "image_generation"
    assert metrics.feature_label("made-up-by-a-client-" + "x" * 50, {"image_generation"}) == \
        "other"
    assert metrics.feature_label(None, {"image_generation"}) == "none"


def test_direct_apply_is_not_counted_twice(settings, db):
    # record_batch is the worker's job after commit; the domain itself never counts.
    before = parse(metrics.render()[0].decode())
    apply(db, {"type": "open_account", "key": "open:direct", "user_id": "direct"})
    after = parse(metrics.render()[0].decode())
    assert value(after, "tokenledger_events_total", outcome="applied", type="open_account",
                 feature="none") == value(before, "tokenledger_events_total",
                                          outcome="applied", type="open_account",
                                          feature="none")


def test_renewal_runs_and_failures_are_exported_from_the_runs_table(settings, db):
    from tokenledger.renewals.models import RenewalRun

    now = utcnow()
    with session_scope(db) as session:
        for status, failed in (("completed", 0), ("completed", 2), ("failed", 7)):
            session.add(RenewalRun(kind="monthly", status=status, as_of=now, chunk_size=100,
                                   candidates=10, total_processed=10, successful=10 - failed,
                                   failed=failed, skipped=0, tokens_granted=0,
                                   total_chunks=1, chunks_done=1, dry_run=False,
                                   continue_on_error=True, trigger="cli", alert=False))
    samples = parse(metrics.render(settings)[0].decode())
    assert value(samples, "tokenledger_renewal_runs_recorded", kind="monthly",
                 status="completed") == 2
    assert value(samples, "tokenledger_renewal_runs_recorded", kind="monthly",
                 status="failed") == 1
    assert value(samples, "tokenledger_renewal_account_failures_total", kind="monthly") == 9
    assert value(samples, "tokenledger_scrape_error", source="renewals") == 0
