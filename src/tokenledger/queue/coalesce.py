"""Coalescing: a worker applies the messages it has in hand as one group.

A task whose base is :class:`Coalescing` is consumed by :func:`strategy` instead of
Celery's per-message requests. The worker's main process keeps the messages it has
received (up to its prefetch) in a buffer and hands them to a pool process as one group:
at once when the pool has a free process and the buffer holds enough work, else after at
most ``max_wait`` seconds. The group is applied in one transaction (the task's
``apply_group``); every message of it is acknowledged only after that transaction
committed. A pool process that dies with a group hands every message back to the broker.
Flower sees one task per group.

Why not celery-batches (read before writing this): it buffers the same way, but
acknowledges a batch when its task returns *whatever happened* (a failure included),
does nothing when the pool process dies (on RabbitMQ the messages then stay unacked until
the worker restarts), sends no task events, and pins Celery below 5.7.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from celery import Task

log = logging.getLogger("tokenledger.worker")

ACK, REQUEUE = "ack", "requeue"
#: A message as a pool process gets it: (id, body, content type, published_at, refused,
#: deliveries the broker counted before this one).
Wire = tuple[str, bytes, str, float | None, str | None, int]
#: The content type of a message taken whole from a Redis list (``queue.intake``): its
#: body is the kombu envelope, which the pool process decodes.
ENVELOPE = "application/x-tokenledger-envelope"


@dataclass(slots=True)
class Delivery:
    """One message in the worker's buffer."""

    message_id: str
    body: bytes
    content_type: str
    published_at: float | None
    events: int
    ack: Callable[[], Any]
    reject: Callable[..., Any]
    #: Why the consumer refused it whole (not decodable, unknown task), else None.
    refused: str | None = None
    #: Deliveries before this one, as the broker counts them (quorum queues) or the
    #: intake's take script does.
    redelivered: int = 0
    #: The intake the message was taken by (acknowledged per group), else None (kombu).
    intake: Any = None
    received: float = field(default_factory=time.monotonic)

    def wire(self) -> Wire:
        return (self.message_id, self.body, self.content_type, self.published_at,
                self.refused, self.redelivered)


class Coalescing(Task):
    """A task applied a group of messages at a time (``apply_group``)."""

    abstract = True
    Strategy = "tokenledger.queue.coalesce:strategy"
    #: At most this many events in one group (one transaction).
    max_group_events = 1000
    #: At most this many bytes of message bodies in one group.
    max_group_bytes = 4 * 1024 * 1024
    #: How long a message waits for company when the pool is free.
    max_wait = 0.002

    def apply_group(self, deliveries: list[Wire]) -> list[str]:
        """Apply the messages in one transaction; ``ack`` or ``requeue`` for each. Runs
        in a pool process."""
        raise NotImplementedError

    def housekeeping(self) -> None:
        """Run in a pool process at worker start and every ``housekeeping_seconds``."""

    #: How often each worker runs :meth:`housekeeping` (None: never).
    housekeeping_seconds: float | None = None


def run_group(task_name: str, deliveries: list[Wire]) -> list[str]:
    """The pool process's side: apply one group with its task."""
    from celery import current_app

    return current_app.tasks[task_name].apply_group(deliveries)


def run_housekeeping(task_name: str) -> None:
    from celery import current_app

    current_app.tasks[task_name].housekeeping()


def _events_hint(message: Any) -> int:
    hint = (message.headers or {}).get("events")
    return hint if isinstance(hint, int) and hint > 0 else 1


def _redelivered(message: Any) -> int:
    headers = message.headers if isinstance(message.headers, dict) else {}
    count = headers.get("x-delivery-count")
    return count if isinstance(count, int) and count > 0 else 0


def _eta_delay(message: Any) -> float | None:
    """Seconds until a deferred message's ``eta`` (None when it has none or it passed).
    A delay, because kombu's timer runs on the monotonic clock, not on wall time."""
    eta = (message.headers or {}).get("eta")
    if not eta:
        return None
    try:
        moment = datetime.fromisoformat(eta).timestamp()
    except (TypeError, ValueError):
        return None
    delay = moment - time.time()
    return delay if delay > 0 else None


class _Grouper:
    def __init__(self, task: Coalescing, consumer: Any) -> None:
        self.task = task
        self.consumer = consumer
        self.buffer: list[Delivery] = []
        self.buffered_events = 0
        self.in_flight = 0
        self.timer_entry: Any = None
        pool = consumer.pool
        self.slots = max(1, int(getattr(pool, "num_processes", None) or pool.limit or 1))
        self.events = consumer.event_dispatcher if getattr(
            consumer.event_dispatcher, "enabled", False) else None
        self.chores: list[Any] = []
        if task.housekeeping_seconds:
            self.chores = [
                consumer.timer.call_after(1.0, self._housekeeping),
                consumer.timer.call_repeatedly(task.housekeeping_seconds, self._housekeeping)]

    def on_message(self, message: Any, body: Any, ack: Any, reject: Any, callbacks: Any,
                   **_: Any) -> None:
        headers = message.headers or {}
        published_at = headers.get("published_at")
        delivery = Delivery(
            str(headers.get("id") or uuid.uuid4()), message.body, message.content_type or "",
            published_at if isinstance(published_at, int | float) else None,
            _events_hint(message), ack, reject, redelivered=_redelivered(message))
        delay = _eta_delay(message)
        if delay is not None:  # a deferred message: joins a buffer when its time comes
            self.consumer.qos.increment_eventually()
            self.consumer.timer.call_after(delay, self._due, (delivery,), priority=6)
            return
        self._add(delivery)

    def refuse(self, message: Any, reason: str) -> None:
        """A message the consumer cannot execute: dead-lettered by the next group."""
        headers = message.headers if isinstance(message.headers, dict) else {}
        body = message.body if isinstance(message.body, bytes) else str(message.body).encode()
        self._add(Delivery(
            str(headers.get("id") or uuid.uuid4()), body, message.content_type or "", None, 1,
            lambda *a, **k: self.consumer.call_soon_ack(message.ack_log_error, *a, **k),
            lambda *a, **k: self.consumer.call_soon_ack(message.reject_log_error, *a, **k),
            refused=reason, redelivered=_redelivered(message)))

    # -- the intake (queue.intake): messages taken in bulk ---------------------------------

    def wanted(self) -> int:
        """How many more messages the intake should take now: a group for every free
        pool process, and one in reserve; none while that much is buffered."""
        free = self.slots - self.in_flight
        return max(0, (free + 1) * self.task.max_group_events - self.buffered_events)

    def take(self, message_id: str, item: Any, events: int, count: int, ack: Any,
             requeue: Any) -> None:
        """A message the intake took (dispatched by the next ``flush``)."""
        body = item if isinstance(item, bytes) else str(item).encode()
        delivery = Delivery(message_id, body, ENVELOPE, None, events, ack, requeue,
                            redelivered=count - 1, intake=True)
        self.buffer.append(delivery)
        self.buffered_events += events

    def release_buffer(self) -> list[str]:
        """Drop the intake's messages from the buffer (shutting down): their ids."""
        mine = [d for d in self.buffer if d.intake]
        self.buffer = [d for d in self.buffer if not d.intake]
        self.buffered_events = sum(d.events for d in self.buffer)
        return [d.message_id for d in mine]

    def close(self) -> None:
        """Replaced after a connection restart: the buffered messages belong to the old
        channel (the broker delivers them again), so they are dropped here."""
        self.buffer.clear()
        self.buffered_events = 0
        for entry in self.chores:
            entry.cancel()
        if self.timer_entry is not None:
            self.timer_entry.cancel()
            self.timer_entry = None

    def _housekeeping(self) -> None:
        def failed(exc: Any) -> None:
            log.warning("housekeeping of %s failed: %r", self.task.name, exc)

        try:
            self.consumer.pool.apply_async(run_housekeeping, args=(self.task.name,),
                                           error_callback=failed)
        except Exception as exc:  # noqa: BLE001 - tried again on the next tick
            failed(exc)

    def _due(self, delivery: Delivery) -> None:
        self.consumer.qos.decrement_eventually()
        self._add(delivery)

    def _add(self, delivery: Delivery) -> None:
        self.buffer.append(delivery)
        self.buffered_events += delivery.events
        if self.in_flight < self.slots and self._enough():
            self.flush()
        elif self.timer_entry is None:
            self.timer_entry = self.consumer.timer.call_after(self.task.max_wait, self._tick)

    def _enough(self) -> bool:
        return self.buffered_events >= self.task.max_group_events

    def _tick(self) -> None:
        self.timer_entry = None
        self.flush()
        if self.buffer and self.timer_entry is None:
            self.timer_entry = self.consumer.timer.call_after(self.task.max_wait, self._tick)

    def flush(self) -> None:
        """Hand groups to free pool processes while there is work and a free one."""
        while self.buffer and self.in_flight < self.slots:
            group: list[Delivery] = []
            events = size = 0
            for delivery in self.buffer:
                if group and (events + delivery.events > self.task.max_group_events
                              or size + len(delivery.body) > self.task.max_group_bytes):
                    break
                group.append(delivery)
                events += delivery.events
                size += len(delivery.body)
            del self.buffer[:len(group)]
            self.buffered_events -= events
            self._dispatch(group)

    def _event(self, kind: str, **fields: Any) -> None:
        """A task event for Flower (best effort: monitoring never costs a message)."""
        if self.events is not None:
            try:
                self.events.send(kind, **fields)
            except Exception as exc:  # noqa: BLE001
                log.debug("task event %s not sent: %s", kind, exc)

    def _dispatch(self, group: list[Delivery]) -> None:
        self.in_flight += 1
        group_id = str(uuid.uuid4())
        started = time.monotonic()
        if self.events is not None:
            summary = f"{len(group)} message(s), {sum(d.events for d in group)} event(s)"
            self._event("task-received", uuid=group_id, name=self.task.name, args=summary,
                        kwargs="{}", retries=0, eta=None, root_id=group_id, parent_id=None)
            self._event("task-started", uuid=group_id)
        errors = self.consumer.connection_errors

        def settle(answers: list[str]) -> None:
            # kombu's messages one by one; the intake's in one round trip per group.
            acked: list[Delivery] = []
            requeued: list[Delivery] = []
            for delivery, answer in zip(group, answers, strict=True):
                if delivery.intake:
                    (acked if answer == ACK else requeued).append(delivery)
                elif answer == ACK:
                    delivery.ack(log, errors)
                else:
                    delivery.reject(log, errors, requeue=True)
            try:
                if acked:
                    acked[0].ack([d.message_id for d in acked])
                if requeued:
                    requeued[0].reject([d.message_id for d in requeued])
            except Exception as exc:  # noqa: BLE001 - the reconciler settles them later
                log.warning("could not settle %d message(s) with the queue: %s",
                            len(acked) + len(requeued), exc)

        def done(answers: list[str]) -> None:
            self.in_flight -= 1
            settle(answers)
            self._event("task-succeeded", uuid=group_id,
                        result=f"{answers.count(ACK)} acknowledged",
                        runtime=time.monotonic() - started)
            self.flush()

        def failed(exc: Any) -> None:
            # The pool process died (or the group runner itself broke): every message
            # goes back to the queue, and counts a delivery against its limit.
            self.in_flight -= 1
            log.error("a group of %d message(s) failed in the pool: %r", len(group), exc)
            settle([REQUEUE] * len(group))
            self._event("task-failed", uuid=group_id, exception=repr(exc), traceback="")
            self.flush()

        try:
            self.consumer.pool.apply_async(
                run_group, args=(self.task.name, [d.wire() for d in group]),
                callback=done, error_callback=failed)
        except Exception as exc:  # noqa: BLE001 - handed back, never stranded
            failed(exc)


def strategy(task: Coalescing, app: Any, consumer: Any, **_: Any) -> Callable[..., None]:
    """Celery's strategy hook: this task's messages go to a buffer, not to requests."""
    old = getattr(consumer, "tokenledger_grouper", None)
    if old is not None:
        old.close()
    grouper = consumer.tokenledger_grouper = _Grouper(task, consumer)
    return grouper.on_message
