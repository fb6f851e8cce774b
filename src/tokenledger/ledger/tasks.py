"""The ledger's task: the events of the messages a worker holds, applied as one group.

``tokenledger.apply_events`` takes one argument: an event, or a list of up to 1,000. The
worker coalesces the messages it has in hand (``queue.coalesce``) and applies their
events in message order, in one transaction; every message is acknowledged after it
committed. Failures are classified once (``db.errors``):

- the database is unreachable: the group waits with backoff, then hands its messages
  back to the broker (never dead-lettered);
- a race (deadlock, serialization, a key raced): the group is tried again a few times;
- anything else, or a race that keeps failing: the group is split in halves, each in its
  own transaction, down to the one event that fails, which alone goes to the dead-letter
  store while its neighbours are applied.

A message that is not a well-formed call (not JSON, another serializer, a bad signature)
or that was delivered ``MAX_DELIVERIES`` times without a result goes to the dead-letter
store whole, with its raw body and the reason.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tokenledger.db.errors import Failure, classify
from tokenledger.db.sql import statement
from tokenledger.db.uow import UnitOfWork, unit_of_work
from tokenledger.ledger import service as ledger
from tokenledger.ledger.service import BatchResult
from tokenledger.messages import AnyEvent, parse_batch
from tokenledger.ops.logs import log_context
from tokenledger.queue import deadletters, inflight, intake
from tokenledger.queue.app import app
from tokenledger.queue.base import LedgerTask, log
from tokenledger.queue.coalesce import ACK, ENVELOPE, REQUEUE, Coalescing, Wire
from tokenledger.queue.consumer import UNREADABLE
from tokenledger.queue.names import APPLY_EVENTS
from tokenledger.queue.producer import worker_producer
from tokenledger.results import EventResult

MAX_DEFERRALS = 6
RAW_KEPT = 64 * 1024  # bytes of a malformed message kept in its dead letter
RACE_RETRIES = 3
MAX_MESSAGE_BYTES = 20 * 1024 * 1024  # 1,000 events with the largest metadata fit


@dataclass(slots=True)
class _Message:
    message_id: str
    published_at: float | None
    deferrals: int = 0
    events: list[AnyEvent] = field(default_factory=list)
    invalid: list[tuple[Any, str]] = field(default_factory=list)
    refused: str | None = None  # the whole message goes to the dead-letter store
    raw: Any = None
    keys: list[str] = field(default_factory=list)  # every event key it carries


class _Unavailable(Exception):
    """The database stayed unreachable longer than a group may hold its messages."""


class ApplyEvents(Coalescing, LedgerTask):
    """Applies groups of messages of events; see the module's docstring."""

    name = APPLY_EVENTS
    housekeeping_seconds = inflight.RECONCILE_SECONDS

    def housekeeping(self) -> None:
        """The in-flight reconciler (``queue.inflight``): accepted messages that no
        worker holds and no queue keeps are queued again; final ones are cleared."""
        settings = self.settings

        def final_keys(keys: list[str]) -> set[str]:
            if not keys:
                return set()
            with unit_of_work(settings) as uow:
                return set(uow.session.scalars(statement("tokenledger.ledger", "final"),
                                               {"keys": keys}))

        queues = {settings.queue, settings.tasks_queue, settings.renewal_queue
                  or settings.tasks_queue}
        for queue in sorted(queues):
            record = inflight.record_for(settings, queue)
            if record is None:
                return
            # The ledger queue is taken atomically (queue.intake): a message is in the
            # queue, in a worker's hands, or final; a stopped worker's are rescued.
            atomic = queue == settings.queue
            if atomic:
                intake.rescue_dead_workers(record.client, queue)
            report = inflight.reconcile(record, final_keys, atomic=atomic,
                                        visibility_timeout=settings.visibility_timeout)
            if report.requeued or report.cleared:
                log.info("reconciled the in-flight record", extra={
                    "queue": queue, "examined": report.examined, "cleared": report.cleared,
                    "requeued": report.requeued, "held": report.held,
                    "waiting": report.waiting})

    def run(self, payload: Any, deferrals: int = 0) -> dict[str, int]:
        """One message's events, applied here (for an eager call; workers apply groups)."""
        body = json.dumps([[payload], {"deferrals": deferrals} if deferrals else {}, {}])
        self.apply_group([(str(self.request.id or "local"), body.encode(),
                           "application/json", None, None, 0)])
        return {"events": len(payload) if isinstance(payload, list) else 1}

    def apply_group(self, deliveries: list[Wire]) -> list[str]:
        # Every line of the group names its task (message) ids: one, or the first few.
        ids = [d[0] for d in deliveries]
        with log_context(task=self.name, task_id=ids[0] if len(ids) == 1 else None,
                         task_ids=ids[:10] if len(ids) > 1 else None):
            return self._apply_group(deliveries, ids)

    def _apply_group(self, deliveries: list[Wire], ids: list[str]) -> list[str]:
        settings = self.settings
        started = time.perf_counter()
        record = inflight.record_for(settings)
        # Deliveries counted across requeues and crashes: by the in-flight record on
        # Redis, by the broker (x-delivery-count) on a quorum queue.
        # (the intake's take script counted its own, which arrive as ENVELOPE).
        counts = [d[5] + 1 for d in deliveries]
        kombu = [i for i, d in enumerate(deliveries) if d[2] != ENVELOPE]
        if record is not None and kombu:
            try:
                for i, count in zip(kombu, record.begin([ids[i] for i in kombu]),
                                    strict=True):
                    counts[i] = count
            except Exception as exc:  # noqa: BLE001 - the broker is away: uncounted
                log.warning("in-flight record not updated: %s", exc)
        messages = [_parse(d, count) for d, count in zip(deliveries, counts, strict=True)]
        try:
            results = self._apply(messages)
        except _Unavailable:
            inflight.forget(ids, settings)
            return [REQUEUE] * len(deliveries)
        if record is not None:
            try:
                record.defer([r.key for r in results if r.status == "deferred"])
                record.clear(ids, [k for m in messages for k in m.keys])
            except Exception as exc:  # noqa: BLE001 - committed; the reconciler clears it
                log.warning("in-flight record not cleared: %s", exc)
        self._follow_up(messages, results)
        self._record(messages, results, started)
        return [ACK] * len(deliveries)

    # -- applying, with the failure policy -----------------------------------------------

    def _apply(self, messages: list[_Message]) -> list[EventResult]:
        refused = [(m.raw, m.refused, None) for m in messages if m.refused]
        refused += [(raw, reason, raw.get("key") if isinstance(raw, dict) else None)
                    for m in messages for raw, reason in m.invalid]
        events = [e for m in messages for e in m.events]
        sources = {e.key: m.message_id for m in reversed(messages) for e in m.events}
        return self._bisect(events, sources, refused)

    def _bisect(self, events: list[AnyEvent], sources: dict[str, str],
                refused: Sequence[tuple[Any, str, str | None]] = ()) -> list[EventResult]:
        """Apply ``events`` in one transaction, with the group's ``refused`` messages
        dead-lettered in the same one (a poison message costs its group no commit of its
        own); a group that fails is split until each failure is one event."""

        def dead_letters(uow: UnitOfWork) -> None:
            deadletters.record_many(uow.session, refused, uow.now)

        def apply(uow: UnitOfWork) -> list[EventResult]:
            dead_letters(uow)
            return ledger.apply_events(uow, events, sources).results if events else []

        try:
            return self._with_policy(apply, describe=f"{len(events)} event(s)")
        except _Unavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - isolated below, never lost
            if refused:
                self._with_policy(dead_letters, describe="dead letters")
                if not events:
                    return []  # the group was only refused messages: now recorded
            if not events:
                raise
            if len(events) > 1:
                mid = len(events) // 2
                log.warning("splitting a group of %d event(s) after %s: %s", len(events),
                            type(exc).__name__, exc)
                return self._bisect(events[:mid], sources) + self._bisect(events[mid:],
                                                                           sources)
            event = events[0]
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            log.error("dead-lettering an event that fails on its own: %s", reason,
                      extra={"event_key": event.key, "user_id": event.user_id})
            self._with_policy(lambda uow: deadletters.record(
                uow.session, event.to_message(), reason[:2000], uow.now, key=event.key),
                describe="a dead letter")
            return [EventResult(event.key, "dead_lettered", reason)]

    def _with_policy(self, work: Any, describe: str) -> Any:
        """``work(uow)`` in its own unit of work: a race is tried again a few times, an
        unreachable database is waited out (then _Unavailable); anything else raises."""
        settings = self.settings
        races = waited = 0
        reconnected = False
        patience = settings.visibility_timeout * 0.8
        while True:
            try:
                with unit_of_work(settings) as uow:
                    return work(uow)
            except Exception as exc:
                failure = classify(exc)
                if failure is Failure.UNAVAILABLE and not (waited or reconnected) and \
                        getattr(exc, "connection_invalidated", False):
                    # A connection the server dropped (a restart, a terminated
                    # backend): the pool is renewed, so try once more at once.
                    log.warning("database connection lost applying %s; retrying at once: "
                                "%s", describe, type(exc).__name__)
                    reconnected = True
                    continue
                if failure is Failure.UNAVAILABLE:
                    delay = settings.backoff(min(waited, 10))
                    if waited and sum(settings.backoff(min(i, 10)) for i in range(waited)) \
                            + delay > patience:
                        raise _Unavailable(str(exc)) from exc
                    log.warning("database unavailable applying %s; retrying in %ss: %s",
                                describe, delay, type(exc).__name__)
                    waited += 1
                    time.sleep(delay)
                    continue
                if failure is Failure.TRANSIENT and races < RACE_RETRIES:
                    races += 1
                    time.sleep(0.01 * 2**races)
                    continue
                raise

    # -- after commit ---------------------------------------------------------------------

    def _follow_up(self, messages: list[_Message], results: list[EventResult]) -> None:
        """Refunds that arrived before their charge: published again shortly (in a
        message of their own, counted), then dead-lettered."""
        by_key = {r.key: r for r in results}
        deferred: dict[int, list[AnyEvent]] = {}
        for m in messages:
            for event in m.events:
                result = by_key.get(event.key)
                if result is not None and result.status == "deferred":
                    deferred.setdefault(m.deferrals, []).append(event)
        for deferrals, events in deferred.items():
            if deferrals >= MAX_DEFERRALS:
                for event in events:
                    self.dead_letter(event.to_message(),
                                     f"original charge {event.original_key!r} not found",
                                     event.key)
                continue
            log.info("deferring %d event(s) waiting for their original charge", len(events))
            worker_producer(self.settings).send(APPLY_EVENTS, [[e.to_message() for e in events]],
                            {"deferrals": deferrals + 1}, countdown=min(2**deferrals, 30))

    def _record(self, messages: list[_Message], results: list[EventResult],
                started: float) -> None:
        from tokenledger.ops import metrics

        events = [e for m in messages for e in m.events]
        invalid = sum(len(m.invalid) + (1 if m.refused else 0) for m in messages)
        elapsed = time.perf_counter() - started
        published = [m.published_at for m in messages if m.published_at is not None]
        metrics.record_batch(events, results, self._features(), invalid=invalid,
                             seconds=elapsed, published_at=min(published, default=None))
        outcomes: dict[str, int] = {}
        for r in results:
            outcomes[r.status] = outcomes.get(r.status, 0) + 1
        if invalid:
            outcomes["dead_lettered"] = outcomes.get("dead_lettered", 0) + invalid
        extra: dict[str, Any] = {"messages": len(messages), "events": len(events) + invalid,
                                 "outcomes": outcomes, "duration_ms": round(elapsed * 1000, 2)}
        if published:
            extra["latency_ms"] = round(max(0.0, time.time() - min(published)) * 1000, 2)
        if len(events) == 1 and results:
            extra.update(event_key=events[0].key, user_id=events[0].user_id,
                         outcome=results[0].status, event_type=events[0].type)
        log.info("applied %d event(s) of %d message(s) in %.1f ms", len(events) + invalid,
                 len(messages), elapsed * 1000, extra=extra)
        for event, r in zip(events, results, strict=False):
            if r.status in ("conflict", "dead_lettered"):
                log.warning("event %s: %s", r.status, r.reason, extra={
                    "event_key": event.key, "user_id": event.user_id, "outcome": r.status,
                    "event_type": event.type})

    def _features(self) -> Any:
        from tokenledger.catalog.service import cached_catalog

        catalog = cached_catalog(self.settings)
        return catalog.features if catalog is not None else ()


def _open_envelope(raw: bytes) -> tuple[bytes, str, float | None, str | None]:
    """A kombu envelope taken whole by the intake: (body, content type, published_at,
    why it is refused or None)."""
    try:
        envelope = json.loads(raw)
        headers = envelope.get("headers") or {}
        content_type = str(envelope.get("content-type") or "")
        body = envelope["body"]
        if (envelope.get("properties") or {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        body = body if isinstance(body, bytes) else str(body).encode()
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        return raw, UNREADABLE, None, ("a queue entry that is not a kombu message (not a "
                                       f"JSON envelope with a body): {exc}")
    if not isinstance(headers, dict) or "task" not in headers:
        return body, content_type, None, "not a Celery task message (no task header)"
    if headers["task"] != APPLY_EVENTS:
        return body, content_type, None, (
            f"task {headers['task']!r} does not run from the ledger queue: it takes "
            f"{APPLY_EVENTS} only (other tasks go to <queue>.tasks)")
    published_at = headers.get("published_at")
    return body, content_type, published_at if isinstance(published_at, int | float) \
        else None, None


def _parse(delivery: Wire, count: int) -> _Message:
    """One message as the group sees it: its events, its invalid ones, or why it is
    refused whole."""
    message_id, body, content_type, published_at, refused, _ = delivery
    if content_type == ENVELOPE and refused is None:
        body, content_type, published_at, refused = _open_envelope(body)
    m = _Message(message_id, published_at)
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body)
    # A malformed message is kept as it came (bounded); `dlq retry` cannot re-publish it.
    m.raw = {"malformed": True, "message_id": message_id, "content_type": content_type,
             "body": text[:RAW_KEPT], "truncated": len(text) > RAW_KEPT}
    if refused is not None:
        m.refused = refused
        return m
    if len(body) > MAX_MESSAGE_BYTES:
        m.refused = (f"a body of {len(body)} bytes is over the limit of {MAX_MESSAGE_BYTES}"
                     " (1,000 events per message at most)")
        return m
    if content_type != "application/json":
        m.refused = f"content type {content_type!r} refused: tokenledger accepts JSON only"
        return m
    try:
        args, kwargs, _embed = json.loads(text)
    except (ValueError, TypeError) as exc:
        m.refused = f"body is not a JSON task message: {exc}"
        return m
    if not isinstance(args, list) or len(args) != 1 or not isinstance(kwargs, dict) \
            or set(kwargs) - {"deferrals"} \
            or not isinstance(kwargs.get("deferrals", 0), int):
        m.refused = ("bad signature: tokenledger.apply_events takes one argument (an event "
                     f"or a list of them), got args={json.dumps(args)[:200]} "
                     f"kwargs={json.dumps(kwargs)[:200]}")
        return m
    payload = args[0]
    m.keys = [e["key"] for e in (payload if isinstance(payload, list) else [payload])
              if isinstance(e, dict) and isinstance(e.get("key"), str)]
    if count > inflight.MAX_DELIVERIES:
        # Kept as its events, so `dlq retry` can send them again.
        m.raw = args[0]
        m.refused = (f"delivered {count} times without a result (it may stop its worker); "
                     "`tokenledger dlq retry` sends it again")
        return m
    m.deferrals = kwargs.get("deferrals", 0)
    m.raw = args[0]
    m.events, m.invalid = parse_batch(args[0])
    return m


apply_events = app.register_task(ApplyEvents())

__all__ = ["BatchResult", "apply_events"]
