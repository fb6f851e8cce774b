"""The base of the tasks that are not coalesced (renewals, housekeeping): units of work,
failures classified once, retries and dead letters (the ledger's own task, which applies
groups of messages, bisects them: ``ledger.tasks``).

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
from tokenledger.queue import deadletters, inflight

log = logging.getLogger("tokenledger.worker")
# Messages handed back because a retry could not be published, per task id (bounded).
_REQUEUES: dict[str, int] = {}
MAX_REQUEUES = 10


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
        # The message's in-flight record (queue.inflight): counted as taken now, cleared
        # once the task is done with it (not when it is retried or handed back).
        record, task_id = self._record(), self.request.id
        if record is not None and task_id:
            _bookkeeping(record.begin, [task_id])
        with log_context(task_id=task_id, task=self.name):
            try:
                result = super().__call__(*args, **kwargs)
            except (Retry, Reject):
                raise
            except Exception as exc:  # noqa: BLE001 - every failure is routed, none escapes
                result = self._route_failure(exc, args, kwargs)
        if record is not None and task_id:
            _bookkeeping(record.clear, [task_id], [])
        return result

    def _record(self) -> Any:
        if self.request.called_directly:
            return None
        queue = (self.request.delivery_info or {}).get("routing_key") or None
        try:
            return inflight.record_for(self.settings, queue)
        except Exception as exc:  # noqa: BLE001 - bookkeeping never stops the work
            log.warning("no in-flight record for %s: %s", self.name, exc)
            return None

    def _route_failure(self, exc: Exception, args: tuple[Any, ...],
                       kwargs: dict[str, Any]) -> None:
        """Classified once (``db.errors.classify``): the database away → retried with
        backoff for as long as it takes; a race → retried ``max_retries`` times; anything
        else (a bad signature, bad data, a bug) or a race that keeps failing → the
        message goes to the dead-letter store at once."""
        retries = self.request.retries or 0
        settings = self.settings
        failure = classify(exc)
        if failure is Failure.UNAVAILABLE or (failure is Failure.TRANSIENT
                                              and retries < settings.max_retries):
            countdown = settings.backoff(retries)
            metrics.RETRIES.labels(task=self.name).inc()
            log.warning("retrying %s in %ss after %s: %s", self.name, countdown,
                        type(exc).__name__, exc, extra={"retries": retries})
            self._retry_or_requeue(exc, countdown)
        why = "repeated failure" if failure is Failure.TRANSIENT else "permanent failure"
        reason = f"{why} after {retries + 1} attempt(s): {type(exc).__name__}: {exc}"
        log.error("dead-lettering a %s message: %s", self.name, reason)
        self.dead_letter({"task": self.name, "args": list(args), "kwargs": kwargs}, reason)

    def _retry_or_requeue(self, exc: Exception, countdown: int) -> None:
        """Publish the retry; only if *that* fails (the broker is away) hand the message
        back, a bounded number of times per worker process."""
        try:
            raise self.retry(exc=exc, countdown=countdown, max_retries=None)
        except Retry:
            raise
        except Exception as publish_error:  # noqa: BLE001 - the broker, not the task
            task_id = str(self.request.id)
            requeues = _REQUEUES[task_id] = _REQUEUES.get(task_id, 0) + 1
            if requeues > MAX_REQUEUES:
                _REQUEUES.pop(task_id, None)
                raise RuntimeError(f"cannot publish a retry: {publish_error}") from exc
            log.warning("cannot publish a retry of %s (%s); handing the message back",
                        self.name, publish_error)
            time.sleep(1)
            raise Reject(exc, requeue=True) from exc

    def dead_letter(self, payload: Any, reason: str, key: str | None = None) -> None:
        """Store a message in the dead-letter store; if the database is away, retry."""
        try:
            with self.unit_of_work() as uow:
                deadletters.record(uow.session, payload, reason, uow.now, key=key)
        except Exception as exc:  # noqa: BLE001
            if is_transient(exc):
                self._retry_or_requeue(exc, self.settings.backoff(3))
            raise
        metrics.record_dead_letter(payload)


def _bookkeeping(call: Any, *args: Any) -> None:
    """In-flight bookkeeping never stops the work: the reconciler repairs a missed step
    (at worst by running a message twice, which every task absorbs)."""
    try:
        call(*args)
    except Exception as exc:  # noqa: BLE001
        log.warning("in-flight record not updated: %s", exc)
