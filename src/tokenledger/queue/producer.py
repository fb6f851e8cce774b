"""Publishing tokenledger tasks by name: the one producer of the SDK, the CLI, the API
and the workers' follow-up tasks. It imports no worker code."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from celery import Celery

from tokenledger.config import Settings
from tokenledger.queue.config import celery_config
from tokenledger.queue.names import APPLY_EVENTS


class Producer:
    """A Celery app that only publishes, configured like every tokenledger process."""

    def __init__(self, settings: Settings, app: Celery | None = None) -> None:
        self.settings = settings
        self._owned = app is None
        if app is None:
            app = Celery("tokenledger-producer", set_as_current=False)
            app.conf.update(celery_config(settings))
        self.app = app

    def send(self, name: str, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None,
             *, queue: str | None = None, headers: dict[str, Any] | None = None,
             countdown: float | None = None) -> None:
        """Publish task ``name`` (returns once the broker has the message)."""
        self.app.send_task(name, args=list(args), kwargs=kwargs or {},
                           queue=queue or self.settings.queue, headers=headers,
                           countdown=countdown)

    def send_many(self, name: str, argss: Sequence[Sequence[Any]],
                  queue: str | None = None) -> None:
        """Publish one task per argument list over one connection."""
        with self.app.producer_or_acquire() as pub:
            for args in argss:
                self.app.send_task(name, args=list(args), queue=queue or self.settings.queue,
                                   producer=pub)

    def publish_events(self, payload: dict[str, Any] | list[dict[str, Any]]) -> None:
        """Publish one message of events for the workers to apply."""
        # published_at (a message header, not part of the event or its payload hash) lets
        # workers measure publish -> committed latency.
        self.send(APPLY_EVENTS, [payload], headers={"published_at": time.time()})

    def close(self) -> None:
        if self._owned:
            self.app.close()
