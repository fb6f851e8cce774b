"""The workers' consumer: a message that cannot be executed is dead-lettered, not dropped.

Celery logs and discards a message it cannot decode, one of another serializer, one with
no task header or an unknown task name. tokenledger's worker hands each of them to the
ledger task's buffer (``queue.coalesce``) marked with the reason; the pool process that
applies the group stores it in the dead-letter store with its raw body (bounded) and
content type, then it is acknowledged. The worker keeps consuming.

On Redis a queue entry that is not even a kombu envelope (anything pushed onto the list
by hand) made kombu raise inside the worker's event loop, which stopped the worker
("Unrecoverable error") and lost the entry. kombu decodes entries with its module's
``loads``; the worker replaces that one function with :func:`_tolerant_loads`, which
turns such an entry into an envelope of its own (no task header, the raw text as body)
so it takes the path above.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import kombu.transport.redis
from celery import bootsteps
from celery.worker.consumer import Consumer as CeleryConsumer
from kombu.utils.json import loads as kombu_loads

log = logging.getLogger("tokenledger.worker")
UNREADABLE = "application/x-tokenledger-unreadable"


def _tolerant_loads(text: Any) -> Any:
    """kombu's ``loads``, except that an entry which is not a kombu envelope comes back as
    one (content type ``UNREADABLE``) instead of raising in the event loop."""
    try:
        found = kombu_loads(text)
    except ValueError:
        found = None
    if isinstance(found, dict) and "body" in found \
            and isinstance(found.get("properties"), dict):
        return found  # an envelope
    if isinstance(found, list) and len(found) == 3 and isinstance(found[0], dict):
        return found  # (envelope, exchange, routing key): kombu's unacked entry
    tag = str(uuid.uuid4())
    return {"body": text if isinstance(text, str) else str(text), "headers": {},
            "content-type": UNREADABLE, "content-encoding": "utf-8",
            "properties": {"delivery_tag": tag, "delivery_info": {"exchange": "",
                                                                  "routing_key": ""},
                           "priority": 0}}


kombu.transport.redis.loads = _tolerant_loads


class Consumer(CeleryConsumer):
    """Celery's consumer, with malformed messages sent to the dead-letter store."""

    def _refuse(self, message: Any, reason: str) -> None:
        grouper = getattr(self, "tokenledger_grouper", None)
        if grouper is None:  # no ledger task on this worker: Celery's own handling
            log.error("discarding a message this worker cannot execute: %s", reason)
            message.reject_log_error(log, self.connection_errors)
            return
        log.warning("dead-lettering a message that cannot be executed: %s", reason)
        grouper.refuse(message, reason)

    def on_connection_error_after_connected(self, exc: Exception) -> None:
        # Celery 5.7 collects the lost connection's transport before closing it; closing
        # then restores unacknowledged messages through a transport without a client and
        # raises AttributeError, which stopped the worker ("Unrecoverable error") on a
        # broker restart. The messages are restored anyway after the visibility timeout.
        try:
            super().on_connection_error_after_connected(exc)
        except AttributeError as err:
            log.warning("closing the lost broker connection failed (%s); its unacknowledged"
                        " messages come back after the visibility timeout", err)

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        if message.content_type == UNREADABLE:
            self._refuse(message, "a queue entry that is not a kombu message (not a JSON "
                                  "envelope with a body and properties)")
            return
        self._refuse(message, f"cannot decode the message ({message.content_type!r}): "
                              f"{type(exc).__name__}: {exc}")

    def on_unknown_message(self, body: Any, message: Any) -> None:
        self._refuse(message, "not a Celery task message (no task header)")

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        name = (message.headers or {}).get("task") if isinstance(message.headers, dict) \
            else None
        self._refuse(message, f"unknown task name {name!r}: this queue takes "
                              "tokenledger.* tasks only")

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        self._refuse(message, f"invalid task message: {type(exc).__name__}: {exc}")


class IntakeStep(bootsteps.StartStopStep):
    """Makes a worker consume both of tokenledger's queues: on Redis the ledger queue
    through the intake (``queue.intake``) instead of kombu's per-message consumer, and
    ``<queue>.tasks`` through Celery's."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        self.intake: Any = None
        super().__init__(c, **kwargs)

    def start(self, c: Any) -> None:
        from tokenledger.config import get_settings
        from tokenledger.queue.config import is_redis, redis_client
        from tokenledger.queue.intake import Intake

        self.stop(c)
        settings = get_settings()
        ledger, tasks = settings.queue, settings.tasks_queue
        consumed = {q.name for q in c.task_consumer.queues}
        if not consumed & {ledger, tasks}:
            return  # a worker of other queues only (say, renewal chunks)
        if tasks not in consumed:
            c.add_task_queue(tasks)
        grouper = getattr(c, "tokenledger_grouper", None)
        if not is_redis(settings.broker()) or grouper is None:
            if ledger not in consumed:
                c.add_task_queue(ledger)
            return
        if ledger in consumed:
            c.cancel_task_queue(ledger)
        self.intake = Intake(redis_client(settings.broker(), timeout=10), ledger, grouper,
                             c.timer, node=c.hostname)
        self.intake.start()
        log.info("taking %s in bulk (the intake); other tasks from %s", ledger, tasks)

    def stop(self, c: Any) -> None:
        if self.intake is not None:
            self.intake.stop()
            self.intake = None

    def shutdown(self, c: Any) -> None:
        self.stop(c)
