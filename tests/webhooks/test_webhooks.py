"""Webhooks that arrive: recorded in the outbox with the change that caused them, delivered
by a real worker to a local receiver that verifies Standard Webhooks signatures, retried
with backoff when the receiver fails, deduplicated by webhook id, visible and re-sendable."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from sqlalchemy import func, select
from standardwebhooks.webhooks import (
    EmptyWebhookSecretError,
    Webhook,
    WebhookVerificationError,
)

from tests.support import Worker, apply, run_cli, session_scope
from tokenledger import Settings
from tokenledger.db.uow import unit_of_work
from tokenledger.ledger.service import apply_events
from tokenledger.messages import parse_event
from tokenledger.notify.service import set_threshold
from tokenledger.timeutil import utcnow
from tokenledger.tokenprocess import service as token_process
from tokenledger.webhooks import relay
from tokenledger.webhooks.models import WebhookDelivery
from tokenledger.webhooks.service import add_endpoint, list_deliveries

pytestmark = pytest.mark.services

# Short delays so a test sees the whole schedule (production: 5 s ... 10 h, ~27.6 h).
SCHEDULE = "0.3,0.3,0.3"


class Receiver:
    """An HTTP endpoint that verifies each delivery's signature with the standardwebhooks
    verifier, answers 500 to the first ``fail_first`` attempts of every webhook id, and
    keeps what it saw."""

    def __init__(self, fail_first: int = 0) -> None:
        self.fail_first = fail_first
        self.secret: str | None = None
        self.attempts: list[dict[str, Any]] = []  # every request, verified or not
        self.accepted: dict[str, dict[str, Any]] = {}  # webhook id -> payload, deduplicated
        self.cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.handle(self, body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks"

    def handle(self, request: BaseHTTPRequestHandler, body: bytes) -> None:
        headers = {k: v for k, v in request.headers.items()}
        try:
            payload = Webhook(self.secret or "").verify(body, headers)
            verified = True
        except (WebhookVerificationError, EmptyWebhookSecretError):  # refused: sent again
            payload, verified = json.loads(body), False
        webhook_id = headers["webhook-id"]
        with self.cond:
            seen = sum(1 for a in self.attempts if a["webhook_id"] == webhook_id)
            fail = seen < self.fail_first
            self.attempts.append({"webhook_id": webhook_id, "verified": verified,
                                  "type": payload["type"], "failed": fail})
            if verified and not fail:
                self.accepted.setdefault(webhook_id, payload)
            self.cond.notify_all()
        request.send_response(500 if fail or not verified else 204)
        request.end_headers()

    def of(self, type_: str, user: str | None = None) -> list[dict[str, Any]]:
        with self.cond:
            return [p for p in self.accepted.values() if p["type"] == type_
                    and (user is None or p["data"].get("user_id") == user)]

    def wait(self, predicate: Callable[[], bool], timeout: float = 30) -> bool:
        with self.cond:
            return self.cond.wait_for(predicate, timeout)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def own(settings: Settings) -> Settings:
    """This module's queue and a short retry schedule (the worker reads the same)."""
    return settings.model_copy(update={"queue": f"{settings.queue}-webhooks",
                                       "webhook_retry_schedule": SCHEDULE,
                                       "webhook_timeout_seconds": 5.0})


@pytest.fixture(scope="module")
def relay_worker(own: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    w = Worker(own, tmp_path_factory.mktemp("webhooks"), concurrency=2, extra_env={
        "TOKENLEDGER_WEBHOOK_RETRY_SCHEDULE": SCHEDULE,
        "TOKENLEDGER_WEBHOOK_TIMEOUT_SECONDS": "5"}).start()
    yield w
    w.stop()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def subscribe(settings: Settings, receiver: Receiver, *types: str) -> int:
    with unit_of_work(settings) as uow:
        endpoint = add_endpoint(uow.session, receiver.url, types, "test", uow.now)
    receiver.secret = endpoint["secret"]
    return endpoint["id"]


def open_account(settings: Settings, user: str) -> None:
    apply(settings, {"type": "open_account", "key": f"open:{user}", "user_id": user})


def charge(settings: Settings, user: str, amount: int) -> None:
    apply(settings, {"type": "charge", "key": uid("c"), "user_id": user, "amount": amount})


def credit(settings: Settings, user: str, amount: int) -> None:
    apply(settings, {"type": "credit", "key": uid("k"), "user_id": user, "amount": amount,
                     "wallet_type": "STANDARD"})


def deliveries(settings: Settings, **filters: Any) -> list[dict[str, Any]]:
    with unit_of_work(settings) as uow:
        return list_deliveries(uow.session, limit=1000, **filters)


def test_a_receiver_that_fails_first_gets_each_alert_once_signed_after_retries(
        own: Settings, db: Settings, relay_worker: Worker, receiver: Receiver) -> None:
    """Given an endpoint for balance_low and balance_recovered that answers 500 to the first
    two attempts of every message, and an account whose own threshold (3) overrides its
    plan's (1): when its balance falls to 3, then to 2, rises to 10 and falls to 1, the
    worker delivers two balance_low and one balance_recovered, each signed, each after
    three attempts with one webhook id."""
    receiver.fail_first = 2
    endpoint = subscribe(own, receiver, "balance_low", "balance_recovered")
    user = uid("low")
    open_account(own, user)  # Free: 5 tokens
    with unit_of_work(own) as uow:
        set_threshold(uow.session, user, 3, uow.now)
    charge(own, user, 2)   # 3: crosses the account's threshold
    charge(own, user, 1)   # 2: still low, no second alert
    credit(own, user, 8)   # 10: recovered
    charge(own, user, 9)   # 1: crosses again
    assert receiver.wait(lambda: len(receiver.of("balance_low", user)) == 2
                         and len(receiver.of("balance_recovered", user)) == 1)
    time.sleep(1.5)  # past the whole schedule: nothing more may arrive
    lows = sorted(receiver.of("balance_low", user), key=lambda p: p["data"]["ledger_seq"])
    assert [(p["data"]["balance"], p["data"]["threshold"]) for p in lows] == [(3, 3), (1, 3)]
    (recovered,) = receiver.of("balance_recovered", user)
    assert (recovered["data"]["balance"], recovered["data"]["threshold"]) == (10, 3)
    assert all(a["verified"] for a in receiver.attempts)
    by_id: dict[str, list[bool]] = {}
    for a in receiver.attempts:
        by_id.setdefault(a["webhook_id"], []).append(a["failed"])
    assert sorted(by_id.values()) == [[True, True, False]] * 3
    rows = deliveries(own, endpoint_id=endpoint)
    assert sorted((r["event_type"], r["status"], r["attempts"]) for r in rows) == [
        ("balance_low", "delivered", 3), ("balance_low", "delivered", 3),
        ("balance_recovered", "delivered", 3)]


def test_every_balance_writer_records_changes_in_its_own_transaction(
        own: Settings, db: Settings) -> None:
    """A batch, a token-process start and hold expiry each record balance_changed with
    the change; a batch that rolls back records nothing."""
    receiver = Receiver()
    try:
        subscribe(own, receiver, "balance_changed", "hold_expired")
        user, rolled = uid("writer"), uid("rolled")
        open_account(own, user)
        with pytest.raises(RuntimeError), unit_of_work(own) as uow:
            apply_events(uow, [parse_event({"type": "open_account", "key": f"open:{rolled}",
                                            "user_id": rolled})])
            raise RuntimeError("rolled back")
        from tokenledger.messages import StartRequest

        with unit_of_work(own) as uow:
            started = token_process.start(uow, StartRequest(
                user_id=user, feature_endpoint_id="project_creation"), "hold-1")
        assert started.accessible
        with unit_of_work(own, now=utcnow() + timedelta(days=1)) as uow:
            assert token_process.release_expired_holds(uow).holds == 1
        rows = deliveries(own)
        assert sorted(r["event_type"] for r in rows) == [
            "balance_changed", "balance_changed", "balance_changed", "hold_expired"]
        assert {r["payload"]["data"]["user_id"] for r in rows} == {user}
        (expired,) = [r for r in rows if r["event_type"] == "hold_expired"]
        assert (expired["payload"]["data"]["amount"], expired["payload"]["data"]["hold_id"]) \
            == (1, started.hold_id)
        relay.deliver_due(own)  # or the module's worker, woken by the commits
        assert receiver.wait(lambda: len(receiver.accepted) == 4)
        assert all(a["verified"] for a in receiver.attempts)
    finally:
        receiver.close()


def test_recording_an_event_twice_is_one_delivery(own: Settings, db: Settings,
                                                   receiver: Receiver) -> None:
    from tokenledger.webhooks.service import WebhookEvent, record

    subscribe(own, receiver, "renewal_run_finished")
    event = WebhookEvent("renewal_run_finished", "run:7", {"run_id": 7},
                         "renewal_run_finished:7")
    for _ in range(2):
        with unit_of_work(own) as uow:
            record(uow, [event])
    assert len(deliveries(own)) == 1


def test_a_delivery_that_keeps_failing_is_marked_failed_then_redelivered_by_hand(
        own: Settings, db: Settings, relay_worker: Worker, receiver: Receiver) -> None:
    """After the whole schedule fails (1 + 3 attempts) the delivery is failed;
    `webhooks redeliver` sends it again with the same webhook id."""
    receiver.fail_first = 4
    subscribe(own, receiver, "dead_letter_added")
    # A message naming no account is dead-lettered: announced in the same transaction.
    apply(own, {"type": "charge", "key": uid("lost"), "user_id": uid("nobody"), "amount": 1})
    deadline = time.monotonic() + 30
    while deliveries(own, status="failed") == [] and time.monotonic() < deadline:
        time.sleep(0.1)
    (failed,) = deliveries(own, status="failed")
    assert (failed["event_type"], failed["attempts"], failed["last_status"]) == (
        "dead_letter_added", 4, 500)
    shown = run_cli(own, "webhooks", "deliveries", "--status", "failed", "--json")
    assert shown.exit_code == 0 and json.loads(shown.stdout)[0]["id"] == failed["id"]
    result = run_cli(own, "webhooks", "redeliver", str(failed["id"]),
                     TOKENLEDGER_QUEUE=own.queue)
    assert result.exit_code == 0, result.stderr
    assert receiver.wait(lambda: len(receiver.accepted) == 1)
    (payload,) = receiver.accepted.values()
    assert list(receiver.accepted) == [failed["webhook_id"]]
    assert payload["data"]["reason"] == "account not found"
    assert "user_id" not in json.dumps(payload)  # never the dead letter's payload


def test_the_alert_webhook_url_is_an_implicit_endpoint(own: Settings, db: Settings,
                                                       receiver: Receiver) -> None:
    """TOKENLEDGER_ALERT_WEBHOOK_URL receives renewal failure alerts and dead letters
    through the outbox, signed with the implicit endpoint's secret (webhooks list)."""
    # Delivered in this process: its wake-ups go to a queue no worker takes.
    alerting = own.model_copy(update={"alert_webhook_url": receiver.url,
                                      "queue": f"{own.queue}-idle"})
    apply(alerting, {"type": "charge", "key": uid("lost"), "user_id": uid("nobody"),
                     "amount": 1})
    listed = run_cli(alerting, "webhooks", "list", "--secrets", "--json")
    (endpoint,) = json.loads(listed.stdout)
    assert (endpoint["implicit"], endpoint["url"], endpoint["event_types"]) == (
        True, receiver.url, ["renewal_failure_alert", "dead_letter_added"])
    receiver.secret = endpoint["secret"]
    relay.deliver_due(alerting)  # (a worker's run may have tried first: then a retry does)
    assert receiver.wait(lambda: len(receiver.accepted) == 1)
    assert [p["type"] for p in receiver.accepted.values()] == ["dead_letter_added"]
    # A process without the setting leaves it (others may have it); another URL retires it.
    apply(own, {"type": "charge", "key": uid("lost"), "user_id": uid("nobody"), "amount": 1})
    assert [e["id"] for e in json.loads(run_cli(own, "webhooks", "list", "--json").stdout)] \
        == [endpoint["id"]]
    moved = alerting.model_copy(update={"alert_webhook_url": receiver.url + "/v2"})
    apply(moved, {"type": "charge", "key": uid("lost"), "user_id": uid("nobody"),
                  "amount": 1})
    listed = json.loads(run_cli(own, "webhooks", "list", "--json").stdout)
    assert [(e["url"], e["implicit"]) for e in listed] == [(receiver.url + "/v2", True)]


def test_webhooks_add_list_remove_from_the_command_line(own: Settings, db: Settings) -> None:
    added = run_cli(own, "webhooks", "add", "https://example.com/hooks", "-e", "balance_low",
                    "-e", "balance_recovered", "--json")
    assert added.exit_code == 0, added.stderr
    endpoint = json.loads(added.stdout)
    assert endpoint["secret"].startswith("whsec_")
    listed = json.loads(run_cli(own, "webhooks", "list", "--json").stdout)
    assert [(e["id"], e["event_types"]) for e in listed] == [
        (endpoint["id"], ["balance_low", "balance_recovered"])]
    assert "secret" not in listed[0]
    bad = run_cli(own, "webhooks", "add", "ftp://x", "-e", "balance_low")
    assert bad.exit_code == 2 and "url:" in bad.stderr
    bad = run_cli(own, "webhooks", "add", "https://x.example", "-e", "balance_lowish")
    assert bad.exit_code == 2 and "event_types: unknown 'balance_lowish'" in bad.stderr
    user = uid("removed")
    open_account(own, user)
    with session_scope(own) as session:
        pending = session.scalar(select(func.count()).select_from(WebhookDelivery))
    assert pending == 0  # subscribed to lows only: an opening is not one
    removed = run_cli(own, "webhooks", "remove", str(endpoint["id"]))
    assert removed.exit_code == 0 and "removed" in removed.stdout
    assert json.loads(run_cli(own, "webhooks", "list", "--json").stdout) == []
    assert run_cli(own, "webhooks", "remove", str(endpoint["id"])).exit_code == 2


def test_dead_letters_of_one_group_are_one_statement_and_only_new_ones_are_announced(
        own: Settings, db: Settings, receiver: Receiver) -> None:
    """A group's refused messages are stored together: the same message twice is one row
    with two attempts, a message seen before bumps its row, and only the new rows are
    announced (one delivery each)."""
    from tokenledger.queue import deadletters
    from tokenledger.queue.models import DeadLetter

    subscribe(own, receiver, "dead_letter_added")
    seen = {"type": "charge", "key": uid("seen"), "amount": 2**70}
    fresh = {"type": "charge", "key": uid("fresh"), "amount": 2**70}
    with unit_of_work(own) as uow:
        deadletters.record(uow.session, seen, "too big", uow.now, key=seen["key"])
    with unit_of_work(own) as uow:
        deadletters.record_many(uow.session, [(seen, "too big", seen["key"]),
                                              (fresh, "too big", fresh["key"]),
                                              (fresh, "too big", fresh["key"]),
                                              ("{not json", "not JSON", None)], uow.now)
    with session_scope(own) as session:
        rows = {d.key: d.attempts for d in session.scalars(select(DeadLetter))}
    assert rows == {seen["key"]: 2, fresh["key"]: 2, None: 1}
    announced = sorted(d["event_type"] for d in deliveries(own))
    assert announced == ["dead_letter_added"] * 3  # seen once, fresh, the non-JSON one
