"""The SDK's subscriber: a thread listening on the notification channels."""

from __future__ import annotations

import logging
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterable
from typing import TYPE_CHECKING

import redis

from tokenledger.notify.service import EVENTS, BalanceNotice, Callback, channel
from tokenledger.ops.logs import mask_url
from tokenledger.queue.config import redis_py_url

if TYPE_CHECKING:
    from tokenledger.config import Settings

log = logging.getLogger("tokenledger.notify")


class RedisSubscriber:
    """A daemon thread that listens on the notification channels and calls back.

    Reconnects with backoff when Redis goes away (notices published meanwhile are lost:
    re-read balances after a reconnect if that matters). Keeps the highest ledger_seq per
    user and event, so a stale or repeated notice is never delivered.
    """

    def __init__(self, settings: Settings, url: str, max_users: int = 100_000) -> None:
        self.settings = settings
        self.url = url
        self.max_users = max_users
        self._callbacks: list[tuple[Callback, frozenset[str]]] = []
        self._lock = threading.Lock()
        self._seen: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._stop = threading.Event()
        self._subscribed = threading.Event()
        self._thread: threading.Thread | None = None
        self.reconnects = 0
        self.client_name = f"tokenledger-notify-{uuid.uuid4().hex[:12]}"

    def add(self, callback: Callback, events: Iterable[str], timeout: float = 10) -> None:
        """Register ``callback``; on return the channel subscription is live."""
        with self._lock:
            self._callbacks.append((callback, frozenset(events)))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="tokenledger-notify")
                self._thread.start()
        if not self._subscribed.wait(timeout):
            raise TimeoutError(f"could not subscribe to {mask_url(self.url)} in {timeout}s")

    def close(self, timeout: float = 5) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        delay = 0.1
        channels = [channel(self.settings, e) for e in EVENTS]
        while not self._stop.is_set():
            client = redis.Redis.from_url(redis_py_url(self.url), socket_connect_timeout=2,
                                          health_check_interval=10,
                                          client_name=self.client_name)
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(*channels)
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=0.5)
                    if not self._subscribed.is_set() and pubsub.subscribed:
                        self._subscribed.set()
                        delay = 0.1
                    if message is not None and message.get("type") == "message":
                        self._deliver(message["data"])
            except (redis.RedisError, OSError) as exc:
                self._subscribed.clear()
                self.reconnects += 1
                log.warning("notification subscriber lost %s (%s); reconnecting in %.1fs",
                            mask_url(self.url), exc, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, 5.0)
            finally:
                try:
                    pubsub.close()
                    client.close()
                except Exception:  # noqa: BLE001,S110 - closing a dead connection
                    pass

    def _deliver(self, raw: bytes | str) -> None:
        try:
            notice = BalanceNotice.from_json(raw)
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring a malformed balance notice")
            return
        seen_key = (notice.event, notice.user_id)
        seen = self._seen.get(seen_key)
        if seen is not None and seen >= notice.ledger_seq:
            return
        self._seen[seen_key] = notice.ledger_seq
        self._seen.move_to_end(seen_key)
        while len(self._seen) > self.max_users:
            self._seen.popitem(last=False)
        with self._lock:
            callbacks = list(self._callbacks)
        for callback, events in callbacks:
            if notice.event in events:
                try:
                    callback(notice)
                except Exception:  # noqa: BLE001
                    log.exception("balance callback %r failed", callback)
