"""Sending committed notices: to this process's subscribers and to the Redis channels,
from the committing thread (:func:`publish`) or a background thread (:func:`publish_soon`).
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import threading
from typing import TYPE_CHECKING

import redis

from tokenledger.notify.service import (
    BALANCE_CHANGED,
    BalanceNotice,
    BulkNotices,
    channel,
    dispatch_local,
    has_local_subscribers,
    redis_url,
)
from tokenledger.ops.logs import mask_url
from tokenledger.queue.config import redis_py_url

if TYPE_CHECKING:
    from tokenledger.config import Settings

log = logging.getLogger("tokenledger.notify")

_clients: dict[str, redis.Redis] = {}
_clients_lock = threading.Lock()


def client_for(url: str) -> redis.Redis:
    """One Redis client per URL per process (redis-py's pool reconnects after a fork)."""
    with _clients_lock:
        client = _clients.get(url)
        if client is None:
            client = redis.Redis.from_url(redis_py_url(url), socket_connect_timeout=2,
                                          socket_timeout=2, health_check_interval=30)
            _clients[url] = client
        return client


# PUBLISH each line of ARGV[1] to the channel KEYS[1]: one command for thousands of notices.
_PUBLISH_LINES = ("local n = 0 for m in string.gmatch(ARGV[1], '[^\\n]+') do"
                  " redis.call('PUBLISH', KEYS[1], m) n = n + 1 end return n")
# PUBLISH each line of ARGV[1], but its first character, to KEYS[that character] (1-9).
_PUBLISH_TAGGED = ("local n = 0 for m in string.gmatch(ARGV[1], '[^\\n]+') do"
                   " redis.call('PUBLISH', KEYS[tonumber(string.sub(m, 1, 1))],"
                   " string.sub(m, 2)) n = n + 1 end return n")


def publish(settings: Settings, notices: list[BalanceNotice] | BulkNotices) -> None:
    """Tell this process's subscribers and the Redis channels. Never raises: the work is
    already committed, and a lost notice only delays a cache refresh."""
    from tokenledger.ops import metrics

    if isinstance(notices, BulkNotices):
        bulk, notices = notices, list(notices.lows)
        _publish_bulk(settings, bulk)
    if not notices:
        return
    dispatch_local(notices)
    url = redis_url(settings)
    if url is not None:
        # One scripted command: each line is a channel's number and a message, so the
        # notices keep their order across channels, and the client packs one argument.
        channels: dict[str, str] = {}
        lines = []
        for notice in notices:
            tag = channels.get(notice.event)
            if tag is None:
                tag = channels[notice.event] = str(len(channels) + 1)
            lines.append(tag + notice.to_json())
        try:
            script = client_for(url).register_script(_PUBLISH_TAGGED)
            script(keys=[channel(settings, event) for event in channels],
                   args=["\n".join(lines)])
        except redis.RedisError as exc:
            metrics.NOTIFY_ERRORS.inc()
            log.warning("could not publish %d balance notice(s) to %s: %s", len(notices),
                        mask_url(url), exc)
            return
    counts: dict[str, int] = {}
    for notice in notices:
        counts[notice.event] = counts.get(notice.event, 0) + 1
    for name, count in counts.items():
        metrics.NOTIFICATIONS.labels(event=name).inc(count)


def _publish_bulk(settings: Settings, bulk: BulkNotices) -> None:
    from tokenledger.ops import metrics

    if not bulk.count:
        return
    if has_local_subscribers():
        dispatch_local(bulk.notices())
    url = redis_url(settings)
    if url is not None:
        try:
            script = client_for(url).register_script(_PUBLISH_LINES)
            script(keys=[channel(settings, BALANCE_CHANGED)], args=[bulk.messages])
        except redis.RedisError as exc:
            metrics.NOTIFY_ERRORS.inc()
            log.warning("could not publish %d balance notice(s) to %s: %s",
                        bulk.count, mask_url(url), exc)
            return
    metrics.NOTIFICATIONS.labels(event=BALANCE_CHANGED).inc(bulk.count)


class _Publisher:
    """One daemon thread per process that publishes committed notices off the caller's
    path, sending everything queued meanwhile in one Redis pipeline."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[Settings, list[BalanceNotice]] | None] = \
            queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._done = threading.Condition()
        self._pending = 0

    def put(self, settings: Settings, notices: list[BalanceNotice] | BulkNotices) -> None:
        if self._pid != os.getpid():  # first use, or a forked child without the thread
            with self._lock:
                if self._pid != os.getpid():
                    self._queue = queue.SimpleQueue()
                    threading.Thread(target=self._run, daemon=True,
                                     name="tokenledger-notify-publish").start()
                    self._pid = os.getpid()
        with self._done:
            self._pending += 1
        self._queue.put((settings, notices))

    def flush(self, timeout: float) -> bool:
        """Wait until everything queued so far was published (True) or ``timeout``."""
        if self._pid != os.getpid():
            return True
        with self._done:
            return self._done.wait_for(lambda: self._pending == 0, timeout)

    def _run(self) -> None:
        q = self._queue
        while True:
            item = q.get()
            batches: dict[int, tuple[Settings, list[BalanceNotice]]] = {}
            bulks: list[tuple[Settings, BulkNotices]] = []
            taken = 0
            while item is not None:
                taken += 1
                settings, notices = item
                if isinstance(notices, BulkNotices):
                    bulks.append((settings, notices))
                else:
                    batches.setdefault(id(settings), (settings, []))[1].extend(notices)
                try:
                    item = q.get_nowait()
                except queue.Empty:
                    item = None
            for settings, bulk in bulks:
                try:
                    publish(settings, bulk)
                except Exception:  # noqa: BLE001 - the thread must outlive any bug
                    log.exception("publishing %d balance notice(s) failed", bulk.count)
            for settings, notices in batches.values():
                try:
                    publish(settings, notices)
                except Exception:  # noqa: BLE001 - the thread must outlive any bug
                    log.exception("publishing %d balance notice(s) failed", len(notices))
            with self._done:
                self._pending -= taken
                self._done.notify_all()


_publisher = _Publisher()


def publish_soon(settings: Settings, notices: list[BalanceNotice] | BulkNotices) -> None:
    """:func:`publish` from a background thread, for committed notices whose writer should
    not wait for Redis. Same at-most-once delivery; notices of one process keep their
    order."""
    if notices:
        _publisher.put(settings, notices)


def flush_published(timeout: float = 5.0) -> bool:
    """Wait for :func:`publish_soon`'s backlog to be published (True) or ``timeout``."""
    return _publisher.flush(timeout)


atexit.register(flush_published, 2.0)
