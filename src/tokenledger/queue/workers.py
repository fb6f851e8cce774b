"""Which workers are up and which queues each consumes: ``tokenledger status``, the
dashboard's queue page and the "no worker consumes this queue" hints all ask here.

Celery's remote control answers for the queues Celery consumes; on Redis the ledger
queue is taken by the intake (``queue.intake``), which Celery does not see, so each
worker's intake heartbeat adds it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokenledger.config import Settings


@dataclass
class Workers:
    """Workers answering a ping: name -> (answered ok, queues consumed)."""

    ok: dict[str, bool] = field(default_factory=dict)
    queues: dict[str, list[str]] = field(default_factory=dict)
    error: str | None = None

    def consuming(self, queue: str) -> list[str]:
        """The names of the workers that consume ``queue``."""
        return [name for name, qs in self.queues.items() if queue in qs]

    def all_queues(self) -> set[str]:
        return {q for qs in self.queues.values() for q in qs}


def ask(settings: Settings, timeout: float = 1.0) -> Workers:
    """Ping the workers on the broker (within ``timeout`` seconds) and list their queues."""
    from tokenledger.queue.config import is_redis, redis_client
    from tokenledger.queue.producer import Producer

    producer = Producer(settings)
    try:
        inspect = producer.inspect(timeout=timeout)
        replies = inspect.ping() or {}
        by_worker = (inspect.active_queues() or {}) if replies else {}
    except Exception as exc:  # noqa: BLE001 - the caller reports what it could not read
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return Workers(error=f"cannot inspect workers on this broker: {first}")
    finally:
        producer.close()
    out = Workers()
    for name in sorted(replies):
        out.ok[name] = replies[name].get("ok") == "pong"
        out.queues[name] = sorted(q.get("name", "") for q in by_worker.get(name) or [])
    broker = settings.broker()
    if is_redis(broker) and replies:
        from tokenledger.queue.intake import live_nodes

        client = redis_client(broker)
        try:
            taking = live_nodes(client, settings.queue)
        finally:
            client.close()
        for name in out.queues:
            if name in taking and settings.queue not in out.queues[name]:
                out.queues[name] = sorted([*out.queues[name], settings.queue])
    return out


def as_status(w: Workers) -> tuple[dict[str, Any], set[str], str | None]:
    """``tokenledger status``'s shape: {name: {ok, queues}}, every queue, the error."""
    return ({name: {"ok": w.ok[name], "queues": w.queues[name]} for name in w.ok},
            w.all_queues(), w.error)
