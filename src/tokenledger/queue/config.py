"""Celery configuration shared by every tokenledger process (producers and workers)."""

from __future__ import annotations

import os
from typing import Any

from tokenledger.config import Settings
from tokenledger.queue.names import APPLY_EVENTS

REDIS_SCHEMES = ("redis://", "rediss://", "redis+socket://")


def is_redis(url: str) -> bool:
    return url.startswith(REDIS_SCHEMES)


def redis_py_url(url: str) -> str:
    """A broker URL as redis-py takes it (kombu's ``redis+socket://`` is ``unix://``)."""
    return "unix://" + url.removeprefix("redis+socket://") \
        if url.startswith("redis+socket://") else url


def redis_client(url: str, timeout: float = 2.0) -> Any:
    """A new redis-py client for a Redis broker URL (the caller closes it)."""
    import redis

    return redis.Redis.from_url(redis_py_url(url), socket_connect_timeout=timeout,
                                socket_timeout=timeout)


def redis_redelivery(visibility_timeout: int) -> dict[str, Any]:
    """Redis transport options that bring back a dead worker's messages promptly.

    Kombu scans for messages unacknowledged past the visibility timeout only every
    ``unacked_restore_interval`` x ``unacked_restore_throttle`` seconds (10 x 10 by
    default), so a message taken by a worker killed with ``kill -9`` could wait a further
    100 s after its timeout; and a worker killed while holding the scan's mutex stopped
    every scan for 300 s. Here the scan runs every fifth of the timeout (at most 10 s) and
    the mutex outlives a dead holder by at most a minute (restoring is a WATCH/MULTI
    transaction per message, so two scans at once cannot restore a message twice).
    """
    return {
        "visibility_timeout": visibility_timeout,
        "unacked_restore_interval": max(1, min(10, visibility_timeout // 5)),
        "unacked_restore_throttle": 1,
        "unacked_mutex_expire": max(5, min(60, visibility_timeout)),
    }


def task_queue(name: str) -> Any:
    """A tokenledger queue on RabbitMQ: durable and replicated (a quorum queue, which
    also counts each message's deliveries: ``x-delivery-count``)."""
    from kombu import Queue

    return Queue(name, routing_key=name, durable=True,
                 queue_arguments={"x-queue-type": "quorum"})


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery settings every tokenledger process uses: JSON only, late acks."""
    amqp = {}
    if not is_redis(settings.broker()):
        queues = {settings.queue, settings.tasks_queue,
                  settings.renewal_queue or settings.tasks_queue}
        amqp = {"task_queues": [task_queue(q) for q in sorted(queues)],
                "task_default_queue_type": "quorum", "task_create_missing_queue_type": "quorum",
                "worker_detect_quorum_queues": True}
    return amqp | {
        "broker_url": settings.broker(),
        "broker_transport_options": redis_redelivery(settings.visibility_timeout),
        "broker_connection_retry_on_startup": True,
        # JSON only: a pickle message from the broker would be code execution.
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "result_accept_content": ["json"],
        "task_ignore_result": True,
        "result_backend": None,
        # Events on the ledger queue; every other task (beat's too) on <queue>.tasks.
        "task_default_queue": settings.tasks_queue,
        "task_routes": {APPLY_EVENTS: {"queue": settings.queue}},
        "task_acks_late": True,
        # A task still running when the broker connection is lost is stopped: its message
        # is delivered again anyway (late ack), and must not run twice at once.
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "task_reject_on_worker_lost": True,
        # Messages a worker holds per pool process: the ledger task applies what it holds
        # as one group (queue.coalesce), so single events need a deep prefetch to batch.
        "worker_prefetch_multiplier": 64,
        # Malformed messages go to the dead-letter store (queue.consumer).
        "worker_consumer": "tokenledger.queue.consumer:Consumer",
        # Two processes per core: a worker waits on the database (locks, the commit's
        # fsync) about as long as it computes (docs/performance.md).
        "worker_concurrency": settings.worker_concurrency or 2 * (os.cpu_count() or 1),
        "worker_send_task_events": True,
        "task_send_sent_event": False,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "timezone": "UTC",
        "enable_utc": True,
    }
