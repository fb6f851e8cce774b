"""Publishing tokenledger tasks: the one producer of the SDK, the CLI, the API and the
workers' follow-up messages. It imports no worker code.

One long-lived connection per producer, safe to share between threads:

- **Redis**: each message is queued by one atomic script that also records it in the
  in-flight record (``queue.inflight``), so an accepted event survives a worker's death
  until it is final;
- **RabbitMQ**: publisher confirms on a durable queue: the broker itself keeps a message
  until a worker acknowledges it.

``publish_event`` is how single events travel: callers that publish at the same moment
share one message (a group publish, like a database's group commit), and each call
returns once its own event is in the broker. With ``linger_ms`` the producer instead
buffers events for that long and returns at once (``flush`` waits for the buffer); events
in the buffer are lost if the process dies before it is flushed.
"""

from __future__ import annotations

import atexit
import contextlib
import threading
import time
import weakref
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from tokenledger.messages import MAX_BATCH
from tokenledger.queue import message as wire
from tokenledger.queue.names import APPLY_EVENTS

if TYPE_CHECKING:
    from tokenledger.config import Settings


class _Slot:
    __slots__ = ("error", "event", "message_id", "state")

    def __init__(self, event: dict[str, Any]) -> None:
        self.event = event
        self.state = 0  # 0 pending, 1 sent, 2 failed
        self.message_id: str | None = None
        self.error: BaseException | None = None


class _GroupPublish:
    """Concurrent single events share one message: the first caller to find no send in
    progress leads, sending everything waiting (its own event included) in one message;
    callers arriving meanwhile wait, and one of them leads the next message."""

    def __init__(self, send: Any, max_events: int = MAX_BATCH) -> None:
        self._send = send
        self._max = max_events
        self._cond = threading.Condition()
        self._pending: list[_Slot] = []
        self._leading = False

    def submit(self, event: dict[str, Any]) -> str:
        slot = _Slot(event)
        with self._cond:
            self._pending.append(slot)
            while slot.state == 0 and self._leading:
                self._cond.wait()
            if slot.state == 0:
                self._leading = True
        if slot.state == 0:
            try:
                while slot.state == 0:
                    self._send_next()
            finally:
                with self._cond:
                    self._leading = False
                    self._cond.notify_all()
        if slot.state == 2:
            assert slot.error is not None
            raise slot.error
        assert slot.message_id is not None
        return slot.message_id

    def _send_next(self) -> None:
        with self._cond:
            batch, self._pending = self._pending[:self._max], self._pending[self._max:]
        try:
            message_id = self._send([s.event for s in batch])
        except BaseException as exc:
            with self._cond:
                for s in batch:
                    s.state, s.error = 2, exc
                self._cond.notify_all()
            return
        with self._cond:
            for s in batch:
                s.state, s.message_id = 1, message_id
            self._cond.notify_all()


class _Linger:
    """Events buffered for ``linger`` seconds, then sent in one message by a thread."""

    def __init__(self, send: Any, linger: float, max_events: int = MAX_BATCH) -> None:
        self._send = send
        self._linger = linger
        self._max = max_events
        self._cond = threading.Condition()
        self._buffer: list[dict[str, Any]] = []
        self._in_flight = 0
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="tokenledger-linger")
        self._thread.start()

    def submit(self, event: dict[str, Any]) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("the producer is closed")
            self._buffer.append(event)
            if len(self._buffer) >= self._max:
                self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every event submitted so far is in the broker (or raise the error
        that kept one from it)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._cond.notify_all()
            while self._buffer or self._in_flight:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"{len(self._buffer)} event(s) not flushed in time")
                self._cond.wait(left)
            error, self._error = self._error, None
        if error is not None:
            raise error

    def close(self) -> None:
        try:
            self.flush(timeout=30)
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._buffer and not self._closed:
                    self._cond.wait()
                if self._closed and not self._buffer:
                    return
                if len(self._buffer) < self._max and not self._closed:
                    self._cond.wait(self._linger)
                batch, self._buffer = self._buffer[:self._max], self._buffer[self._max:]
                self._in_flight += len(batch)
            try:
                self._send(batch)
            except BaseException as exc:  # noqa: BLE001 - handed to the next flush
                with self._cond:
                    self._error = exc
            finally:
                with self._cond:
                    self._in_flight -= len(batch)
                    self._cond.notify_all()


class Producer:
    """Publishes tokenledger tasks by name over one connection (thread-safe)."""

    def __init__(self, settings: Settings, *, linger_ms: float = 0) -> None:
        from tokenledger.queue.config import is_redis

        self.settings = settings
        self.queue = settings.queue
        broker = settings.broker()
        self._sender: _RedisSender | _AmqpSender = (
            _RedisSender(broker, settings) if is_redis(broker) else _AmqpSender(broker, settings))
        self._group = _GroupPublish(self._send_events)
        self._linger = _Linger(self._send_events, linger_ms / 1000) if linger_ms > 0 else None
        if self._linger is not None:
            _LINGERING.add(self)

    # -- events -------------------------------------------------------------------------

    def publish_event(self, event: dict[str, Any]) -> str | None:
        """One validated event: shares a message with concurrent callers, and returns
        once it is in the broker (its message id); with ``linger_ms``, buffers it and
        returns None at once."""
        if self._linger is not None:
            self._linger.submit(event)
            return None
        return self._group.submit(event)

    def publish_events(self, payload: dict[str, Any] | list[dict[str, Any]]) -> str:
        """One message holding ``payload`` (an event, or a list of up to 1,000, validated
        or not: a worker dead-letters what fails validation); its message id."""
        return self._sender.send_events(payload)

    def _send_events(self, events: list[dict[str, Any]]) -> str:
        return self._sender.send_events(events[0] if len(events) == 1 else events)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every lingering event is in the broker."""
        if self._linger is not None:
            self._linger.flush(timeout)

    # -- other tasks ----------------------------------------------------------------------

    def send(self, name: str, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None,
             *, queue: str | None = None, countdown: float | None = None) -> str:
        """Publish task ``name`` (returns once the broker has the message); its id. Events
        go to the ledger queue, anything else (a deferred message too) to ``<queue>.tasks``."""
        extra = None
        if countdown:
            extra = {"eta": (datetime.now(UTC) + timedelta(seconds=countdown)).isoformat()}
        if queue is None:
            queue = self.queue if name == APPLY_EVENTS and not countdown \
                else self.settings.tasks_queue
        return self._sender.send(name, queue, args, kwargs, extra)

    def send_many(self, name: str, argss: Sequence[Sequence[Any]],
                  queue: str | None = None) -> None:
        """Publish one task per argument list (pipelined on Redis)."""
        self._sender.send_many(name, queue or (
            self.queue if name == APPLY_EVENTS else self.settings.tasks_queue), argss)

    def inspect(self, timeout: float = 1.0) -> Any:
        """Celery's remote-control inspector on this broker (workers answering pings)."""
        from celery import Celery

        from tokenledger.queue.config import celery_config

        app = Celery("tokenledger-inspect", set_as_current=False)
        app.conf.update(celery_config(self.settings))
        return app.control.inspect(timeout=timeout)

    def pending(self, event_key: str) -> bool | None:
        """Whether ``event_key`` was accepted and is not final yet (None: this broker
        keeps no such record)."""
        return self._sender.pending(event_key)

    def purge(self, queue: str | None = None) -> None:
        """Drop every message waiting in ``queue`` (and, on Redis, its in-flight record)."""
        self._sender.purge(queue or self.queue)

    def close(self) -> None:
        if self._linger is not None:
            self._linger.close()
            _LINGERING.discard(self)
        self._sender.close()


@contextlib.contextmanager
def _broker_errors(url: str, errors: tuple[type[BaseException], ...]) -> Any:
    """The broker's own exceptions as tokenledger's BrokerUnavailable (cause chained)."""
    try:
        yield
    except errors as exc:
        from tokenledger.errors import BrokerUnavailable
        from tokenledger.ops.logs import mask_url

        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BrokerUnavailable(
            f"the broker at {mask_url(url)} did not take the message ({first}); is it "
            "running? (TOKENLEDGER_BROKER_URL)") from exc


class _RedisSender:
    def __init__(self, broker: str, settings: Settings) -> None:
        import redis

        from tokenledger.queue.config import redis_py_url
        from tokenledger.queue.inflight import Record

        self.url = broker
        self.client = redis.Redis.from_url(redis_py_url(broker), socket_connect_timeout=5,
                                           socket_timeout=10, health_check_interval=30)
        self.default_queue = settings.queue
        self._records: dict[str, Record] = {}

    def record(self, queue: str) -> Any:
        from tokenledger.queue.inflight import Record

        record = self._records.get(queue)
        if record is None:
            record = self._records[queue] = Record(self.client, queue)
        return record

    def _errors(self) -> Any:
        import redis

        return _broker_errors(self.url, (redis.RedisError, OSError))

    def send_events(self, payload: dict[str, Any] | list[dict[str, Any]]) -> str:
        queue = self.default_queue
        events = payload if isinstance(payload, list) else [payload]
        task_id, message = wire.redis_envelope(APPLY_EVENTS, queue, [payload],
                                               extra_headers={"events": len(events) or 1})
        keys = [e["key"] for e in events if isinstance(e, dict) and isinstance(e.get("key"), str)]
        with self._errors():
            self.record(queue).publish(task_id, message, keys)
        return task_id

    def send(self, name: str, queue: str, args: Sequence[Any], kwargs: dict[str, Any] | None,
             extra: dict[str, Any] | None) -> str:
        task_id, message = wire.redis_envelope(name, queue, args, kwargs, extra_headers=extra)
        with self._errors():
            self.record(queue).publish(task_id, message, [])
        return task_id

    def send_many(self, name: str, queue: str, argss: Sequence[Sequence[Any]]) -> None:
        with self._errors():
            record = self.record(queue)
            pipe = self.client.pipeline(transaction=False)
            for args in argss:
                record.publish(*wire.redis_envelope(name, queue, args), [], client=pipe)
            pipe.execute()

    def pending(self, event_key: str) -> bool:
        with self._errors():
            return self.record(self.default_queue).pending(event_key)

    def purge(self, queue: str) -> None:
        n = self.record(queue).names
        with self._errors():
            self.client.delete(queue, n.inflight, n.message, n.keys, n.attempts, n.received)

    def close(self) -> None:
        self.client.close()


class _AmqpSender:
    def __init__(self, broker: str, settings: Settings) -> None:
        from kombu import Connection

        self.url = broker
        self.connection = Connection(broker, transport_options={"confirm_publish": True},
                                     connect_timeout=5)
        self.default_queue = settings.queue
        self._lock = threading.Lock()
        self._producer: Any = None
        self._declared: set[str] = set()

    def _publish(self, name: str, queue: str, args: Sequence[Any],
                 kwargs: dict[str, Any] | None, extra: dict[str, Any] | None) -> str:
        from kombu.exceptions import KombuError, OperationalError

        from tokenledger.queue.config import task_queue

        task_id = wire.new_id()
        with self._lock, _broker_errors(self.url, (OperationalError, KombuError, OSError)):
            if self._producer is None:
                self._producer = self.connection.Producer()
            declare = [] if queue in self._declared else [task_queue(queue)]
            self._producer.publish(
                wire.task_body(args, kwargs), routing_key=queue, exchange="",
                content_type=wire.CONTENT_TYPE, content_encoding="utf-8",
                headers=wire.headers(name, task_id, extra), correlation_id=task_id,
                delivery_mode=2, declare=declare, retry=True,
                retry_policy={"max_retries": 3, "interval_start": 0.2})
            self._declared.add(queue)
        return task_id

    def send_events(self, payload: dict[str, Any] | list[dict[str, Any]]) -> str:
        events = len(payload) if isinstance(payload, list) else 1
        return self._publish(APPLY_EVENTS, self.default_queue, [payload], None,
                             {"events": events or 1})

    def send(self, name: str, queue: str, args: Sequence[Any], kwargs: dict[str, Any] | None,
             extra: dict[str, Any] | None) -> str:
        return self._publish(name, queue, args, kwargs, extra)

    def send_many(self, name: str, queue: str, argss: Sequence[Sequence[Any]]) -> None:
        for args in argss:
            self._publish(name, queue, args, None, None)

    def pending(self, event_key: str) -> None:
        return None

    def purge(self, queue: str) -> None:
        with self._lock:
            self.connection.default_channel.queue_purge(queue)

    def close(self) -> None:
        self.connection.release()


_worker_producers: dict[int, Producer] = {}


def worker_producer(settings: Settings) -> Producer:
    """This process's producer for a worker's follow-up messages (kept for its life)."""
    import os

    found = _worker_producers.get(os.getpid())
    if found is None:
        found = _worker_producers[os.getpid()] = Producer(settings)
    return found


# Producers that linger flush what they hold when the process exits.
_LINGERING: weakref.WeakSet[Producer] = weakref.WeakSet()


@atexit.register
def _flush_lingering() -> None:
    for producer in list(_LINGERING):
        with contextlib.suppress(Exception):  # exiting: nobody is left to tell
            producer.flush(timeout=10)
