"""Sending the outbox: signed POSTs with retries and backoff, run by the workers.

A relay run (the ``tokenledger.deliver_webhooks`` task) claims the due deliveries in one
short transaction, sends them outside any transaction (a slow endpoint holds no lock),
then records what each attempt came to in another: delivered on a 2xx answer; otherwise
due again after the next delay of ``TOKENLEDGER_WEBHOOK_RETRY_SCHEDULE``, or failed once
it is spent. Each attempt is signed per the Standard Webhooks specification
(``webhook-id``, ``webhook-timestamp``, ``webhook-signature``); the webhook id is the same
on every attempt, so receivers deduplicate by it.

A run starts when a change that recorded deliveries commits (:func:`wake`, debounced per
process), when the relay's timer fires (each run arms it for the next retry, at most a
minute ahead), and from beat every 30 s as a safety net.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import httpx
from prometheus_client import Counter
from standardwebhooks.webhooks import Webhook

from tokenledger.db.sql import statement
from tokenledger.db.uow import unit_of_work
from tokenledger.ops.logs import mask_url
from tokenledger.timeutil import utcnow

if TYPE_CHECKING:
    from tokenledger.config import Settings

log = logging.getLogger("tokenledger.webhooks")

ATTEMPTS = Counter("tokenledger_webhook_attempts_total",
                   "Webhook delivery attempts, by event type and result.",
                   ["event_type", "result"])

_PKG = "tokenledger.webhooks"
BATCH = 100  # deliveries claimed per run
SENDERS = 8  # concurrent POSTs per run
LEASE = timedelta(minutes=5)  # a claimed delivery is due again after this if never settled
USER_AGENT = "tokenledger-webhooks/1"


@dataclass(frozen=True, slots=True)
class Attempt:
    """What one POST came to."""

    id: int
    attempts: int
    event_type: str
    ok: bool
    code: int | None
    error: str | None


@dataclass(slots=True)
class RelayReport:
    """What a relay run did, and when the next one should wake (None: nothing pending)."""

    claimed: int = 0
    delivered: int = 0
    retrying: int = 0
    failed: int = 0
    more: bool = False
    wake_at: datetime | None = None


def deliver_due(settings: Settings, limit: int = BATCH) -> RelayReport:
    """Send every due delivery (up to ``limit``) once and record each attempt; arm the
    timer for the next. Safe to run concurrently: a delivery is claimed by one run."""
    now = utcnow()
    with unit_of_work(settings, now=now) as uow:
        claimed = uow.session.execute(statement(_PKG, "claim"), {
            "now": now, "limit": limit, "lease_until": now + LEASE}).all()
    attempts = send_all(settings, claimed) if claimed else []
    report = RelayReport(claimed=len(claimed), more=len(claimed) >= limit)
    delays = settings.retry_delays()
    with unit_of_work(settings) as uow:
        done = uow.now
        if attempts:
            retry_at = [None if a.ok or a.attempts > len(delays)
                        else done + timedelta(seconds=delays[a.attempts - 1])
                        for a in attempts]
            uow.session.execute(statement(_PKG, "settle"), {
                "now": done, "ids": [a.id for a in attempts], "oks": [a.ok for a in attempts],
                "codes": [a.code for a in attempts],
                "errors": [a.error for a in attempts], "retry_at": retry_at,
                "attempts": [a.attempts for a in attempts]})
            for attempt, again in zip(attempts, retry_at, strict=True):
                result = "delivered" if attempt.ok else "retrying" if again else "failed"
                setattr(report, result, getattr(report, result) + 1)
                ATTEMPTS.labels(event_type=attempt.event_type, result=result).inc()
        horizon = timedelta(seconds=max(1, min(60, settings.visibility_timeout // 2)))
        report.wake_at = uow.session.execute(statement(_PKG, "arm"), {
            "now": done, "latest": done + horizon}).scalar_one_or_none()
    if report.failed:
        log.error("%d webhook delivery(ies) failed for good after the last retry: see "
                  "`tokenledger webhooks deliveries --status failed`", report.failed)
    return report


def send_all(settings: Settings, claimed: list[Any]) -> list[Attempt]:
    """POST each claimed delivery (a few at a time); never raises."""
    if len(claimed) == 1:
        return [send(settings, claimed[0])]
    with ThreadPoolExecutor(max_workers=min(SENDERS, len(claimed)),
                            thread_name_prefix="tokenledger-webhook") as pool:
        return list(pool.map(lambda row: send(settings, row), claimed))


def send(settings: Settings, row: Any) -> Attempt:
    """One signed POST of a claimed delivery; a 2xx answer is delivered."""
    body = json.dumps(row.payload, separators=(",", ":"), ensure_ascii=False).encode()
    at = utcnow()
    headers = {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "webhook-id": row.webhook_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": Webhook(row.secret).sign(row.webhook_id, at, body),
    }
    try:
        response = _client(settings).post(row.url, content=body, headers=headers)
    except httpx.HTTPError as exc:
        log.warning("webhook %s to %s: %s", row.webhook_id, mask_url(row.url), exc)
        return Attempt(row.id, row.attempts, row.event_type, False, None,
                       f"{type(exc).__name__}: {exc}"[:500])
    if 200 <= response.status_code < 300:
        return Attempt(row.id, row.attempts, row.event_type, True, response.status_code, None)
    log.warning("webhook %s to %s answered %d", row.webhook_id, mask_url(row.url),
                response.status_code)
    return Attempt(row.id, row.attempts, row.event_type, False, response.status_code,
                   f"HTTP {response.status_code}: {response.text[:300]}")


_clients: dict[tuple[int, float], httpx.Client] = {}
_clients_lock = threading.Lock()


def _client(settings: Settings) -> httpx.Client:
    """One HTTP client per process and timeout (connections are reused between runs)."""
    key = (os.getpid(), settings.webhook_timeout_seconds)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = httpx.Client(
                timeout=settings.webhook_timeout_seconds, follow_redirects=False)
        return client


# -- waking the relay ------------------------------------------------------------------------

WAKE_INTERVAL = 0.2  # at most one relay task per queue per this many seconds per process


class _Waker:
    """One daemon thread per process that sends the relay task for the queues asked to
    wake, each at most once per ``WAKE_INTERVAL``: a wake asked for while one was just sent
    is sent when the interval ends, so every committed delivery has a run after it."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._wanted: dict[tuple[str, str], Settings] = {}
        self._last: dict[tuple[str, str], float] = {}
        self._pid: int | None = None

    def wake(self, settings: Settings) -> None:
        with self._cond:
            if self._pid != os.getpid():  # first use, or a forked child without the thread
                self._pid = os.getpid()
                self._wanted, self._last = {}, {}
                threading.Thread(target=self._run, daemon=True,
                                 name="tokenledger-webhook-wake").start()
            self._wanted[(settings.broker(), settings.queue)] = settings
            self._cond.notify()

    def _run(self) -> None:
        from tokenledger.queue.names import DELIVER_WEBHOOKS
        from tokenledger.queue.producer import Producer

        producers: dict[tuple[str, str], Producer] = {}
        while True:
            with self._cond:
                while True:
                    now = time.monotonic()
                    ready = [k for k in self._wanted
                             if now - self._last.get(k, -WAKE_INTERVAL) >= WAKE_INTERVAL]
                    if ready:
                        break
                    wait = min((self._last[k] + WAKE_INTERVAL - now for k in self._wanted),
                               default=None)
                    self._cond.wait(wait)
                batch = [(k, self._wanted.pop(k)) for k in ready]
                for k in ready:
                    self._last[k] = now
            for key, settings in batch:
                try:
                    producer = producers.get(key) or producers.setdefault(
                        key, Producer(settings))
                    producer.send(DELIVER_WEBHOOKS)
                except Exception as exc:  # noqa: BLE001 - the timer and beat catch up
                    producers.pop(key, None)
                    log.warning("could not wake the webhook relay: %s", exc)


_waker = _Waker()


def wake(settings: Settings) -> None:
    """Have a relay run start soon (sent from a background thread; debounced)."""
    _waker.wake(settings)
