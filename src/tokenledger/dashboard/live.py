"""Live balances for the badge: the API process's one subscription to ``balance_changed``,
fanned out to the event streams of the badges connected to it.

The subscription is the SDK's (``notify.subscriber.RedisSubscriber`` on the Redis channel
``<prefix>balance_changed``; in-process notices when there is no Redis), opened with the
first stream and closed with the app. Notices are at most once, so a stream also re-reads
its balance every so often: a lost notice delays an update, it never loses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from starlette.concurrency import run_in_threadpool

from tokenledger.notify.service import BALANCE_CHANGED, BalanceNotice

if TYPE_CHECKING:
    from tokenledger.config import Settings
    from tokenledger.notify.subscriber import RedisSubscriber

log = logging.getLogger("tokenledger.dashboard")

QUEUE_SIZE = 8


class BalanceFeed:
    """``balance_changed`` notices, per user, for the streams of this process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._streams: dict[str, set[asyncio.Queue[BalanceNotice]]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._subscriber: RedisSubscriber | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._starting: asyncio.Lock | None = None
        self.live = False

    async def start(self) -> bool:
        """Subscribe once (later calls return at once); False if notices cannot be had,
        and streams then rely on re-reading."""
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._loop is not None:
                return self.live
            self._loop = asyncio.get_running_loop()
            try:
                await run_in_threadpool(self._subscribe)
                self.live = True
            except Exception as exc:  # noqa: BLE001 - badges fall back to re-reading
                log.warning("balance badges get no live notices: %s", exc)
            return self.live

    def _subscribe(self) -> None:
        from tokenledger.notify.service import redis_url, subscribe

        url = redis_url(self.settings)
        if url is None:
            self._unsubscribe = subscribe(self._heard, (BALANCE_CHANGED,))
            return
        from tokenledger.notify.subscriber import RedisSubscriber

        self._subscriber = RedisSubscriber(self.settings, url)
        self._subscriber.add(self._heard, (BALANCE_CHANGED,))

    def _heard(self, notice: BalanceNotice) -> None:
        # In the subscriber's thread: hand the notice to the event loop.
        loop = self._loop
        if loop is not None and notice.user_id in self._streams:
            with contextlib.suppress(RuntimeError):  # the loop has closed
                loop.call_soon_threadsafe(self._deliver, notice)

    def _deliver(self, notice: BalanceNotice) -> None:
        for queue in self._streams.get(notice.user_id, ()):
            if queue.full():
                queue.get_nowait()  # the newest notice is all a badge needs
            queue.put_nowait(notice)

    def listen(self, user_id: str) -> asyncio.Queue[BalanceNotice]:
        """A queue receiving ``user_id``'s notices until :meth:`forget`."""
        queue: asyncio.Queue[BalanceNotice] = asyncio.Queue(QUEUE_SIZE)
        self._streams.setdefault(user_id, set()).add(queue)
        return queue

    def forget(self, user_id: str, queue: asyncio.Queue[BalanceNotice]) -> None:
        """Stop sending ``user_id``'s notices to ``queue`` (its stream ended)."""
        streams = self._streams.get(user_id)
        if streams is not None:
            streams.discard(queue)
            if not streams:
                del self._streams[user_id]

    def close(self) -> None:
        """End the subscription (with the app)."""
        if self._subscriber is not None:
            self._subscriber.close()
            self._subscriber = None
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
