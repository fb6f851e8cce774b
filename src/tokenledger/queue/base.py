"""The one base task: units of work, retries, poison-batch bisection and dead letters.

Task bodies stay thin; everything about failure lives here (warehouse's WarehouseTask,
dramatiq's middleware).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery import Task
from celery.exceptions import Reject, Retry

from tokenledger.config import Settings, get_settings
from tokenledger.db.errors import Failure, classify, is_transient
from tokenledger.db.uow import UnitOfWork, unit_of_work
from tokenledger.ops import metrics
from tokenledger.ops.logs import log_context
from tokenledger.queue import deadletters

log = logging.getLogger("tokenledger.worker")


class LedgerTask(Task):
    """Acks only after commit; retries with backoff; never loses or loops on a message."""

    abstract = True
    acks_late = True
    reject_on_worker_lost = True
    max_retries = None  # the policy below decides

    @property
    def settings(self) -> Settings:
        return get_settings()

    @contextmanager
    def unit_of_work(self) -> Iterator[UnitOfWork]:
        with unit_of_work(self.settings) as uow:
            yield uow

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with log_context(task_id=self.request.id, task=self.name):
            try:
                return super().__call__(*args, **kwargs)
            except (Retry, Reject):
                raise
            except Exception as exc:  # noqa: BLE001 - every failure is routed, none escapes
                return self._route_failure(exc, args, kwargs)

    # -- observability: metrics and logs --------------------------------------------------

    def record_batch(self, events: list[Any], invalid: int, result: Any, started: float,
                     features: Any = ()) -> None:
        """After commit: count outcomes, batch size and latency; log one summary line."""
        results = result.results if result is not None else []
        elapsed = time.perf_counter() - started
        published_at = self.request.get("published_at")
        if not isinstance(published_at, int | float):
            published_at = None
        metrics.record_batch(events, results, features, invalid=invalid, seconds=elapsed,
                             published_at=published_at)
        outcomes: dict[str, int] = {}
        for r in results:
            outcomes[r.status] = outcomes.get(r.status, 0) + 1
        if invalid:
            outcomes["dead_lettered"] = outcomes.get("dead_lettered", 0) + invalid
        extra: dict[str, Any] = {"events": len(events) + invalid, "outcomes": outcomes,
                                 "duration_ms": round(elapsed * 1000, 2)}
        if published_at is not None:
            extra["latency_ms"] = round(max(0.0, time.time() - published_at) * 1000, 2)
        if len(events) == 1 and results:
            extra.update(event_key=events[0].key, user_id=events[0].user_id,
                         outcome=results[0].status, event_type=events[0].type)
        log.info("applied %d event(s) in %.1f ms", len(events) + invalid, elapsed * 1000,
                 extra=extra)
        for event, r in zip(events, results, strict=False):
            if r.status in ("conflict", "dead_lettered"):
                log.warning("event %s: %s", r.status, r.reason, extra={
                    "event_key": event.key, "user_id": event.user_id, "outcome": r.status,
                    "event_type": event.type})
            elif log.isEnabledFor(logging.DEBUG):
                log.debug("event %s", r.status, extra={
                    "event_key": event.key, "user_id": event.user_id, "outcome": r.status,
                    "event_type": event.type, "reason": r.reason})

    def _route_failure(self, exc: Exception, args: tuple[Any, ...],
                       kwargs: dict[str, Any]) -> None:
        retries = self.request.retries or 0
        settings = self.settings
        # The database is unreachable: the message is safe in the broker; wait it out.
        if classify(exc) is Failure.UNAVAILABLE or retries < settings.max_retries:
            countdown = settings.backoff(retries)
            metrics.RETRIES.labels(task=self.name).inc()
            log.warning("retrying %s in %ss after %s: %s", self.name, countdown,
                        type(exc).__name__, exc, extra={"retries": retries})
            self._retry_or_requeue(exc, countdown)
        # Out of retries: a batch is bisected so one poison event cannot sink the others.
        payload = args[0] if args else kwargs.get("payload")
        if isinstance(payload, list) and len(payload) > 1:
            mid = len(payload) // 2
            log.error("%s failed %d times; splitting a batch of %d", self.name, retries + 1,
                      len(payload))
            for half in (payload[:mid], payload[mid:]):
                self.apply_async(args=[half], kwargs={k: v for k, v in kwargs.items()
                                                      if k != "payload"})
            return
        reason = f"repeated failure after {retries + 1} attempts: {type(exc).__name__}: {exc}"
        log.error("dead-lettering a message: %s", reason)
        self.dead_letter(payload, reason)

    def _retry_or_requeue(self, exc: Exception, countdown: int) -> None:
        try:
            raise self.retry(exc=exc, countdown=countdown, max_retries=None)
        except Retry:
            raise
        except Exception:  # noqa: BLE001 - the broker is down too: hand the message back
            time.sleep(1)
            raise Reject(exc, requeue=True) from exc

    def dead_letter(self, payload: Any, reason: str, key: str | None = None) -> None:
        """Store a message in the dead-letter store; if even that fails, requeue it."""
        try:
            with self.unit_of_work() as uow:
                deadletters.record(uow.session, payload, reason, uow.now, key=key)
        except Exception as exc:  # noqa: BLE001
            if is_transient(exc):
                self._retry_or_requeue(exc, self.settings.backoff(3))
            raise
        metrics.record_dead_letter(payload)
