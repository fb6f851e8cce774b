"""The durable record of every accepted message on a Redis broker, until it is final.

kombu's Redis transport takes a message with ``BRPOP`` and only afterwards records it as
unacknowledged; a worker killed in between loses it (celery/kombu#305, celery#4354).
So the producer records each message in the same atomic script that queues it:

- ``tokenledger:{queue}:inflight`` (sorted set): message id -> when Redis accepted it (ms);
- ``tokenledger:{queue}:message`` (hash): message id -> the message as queued;
- ``tokenledger:{queue}:keys`` (hash): event key -> message id (a key is "pending");
- ``tokenledger:{queue}:attempts`` (hash): message id -> deliveries a worker began;
- ``tokenledger:{queue}:received`` (string): the newest acceptance time of any message a
  worker has taken (the queue is first in, first out: an older message is no longer
  waiting in it).

A worker clears a message's record after the transaction that applied it committed. The
reconciler (:func:`reconcile`, a beat task every ``RECONCILE_SECONDS`` and at worker
start) looks at records older than ``stale_after``: one whose events all have a stored
outcome or a dead letter is cleared; one that no worker holds and that is no longer
waiting in the queue was lost, and is queued again as it was (idempotency makes that
safe); one a worker holds is left to kombu, which redelivers it after the visibility
timeout if that worker died. A message whose deliveries keep ending without a result
(it kills its worker) is dead-lettered after ``MAX_DELIVERIES``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("tokenledger.queue")

MAX_DELIVERIES = 5
RECONCILE_SECONDS = 15
STALE_AFTER_SECONDS = 30
RECONCILE_BATCH = 500
# A deferred refund is published again up to 6 times, at most 30 s apart (ledger.tasks):
# its key stays pending this long after each deferral.
DEFERRED_SECONDS = 120

# Queue a message and record it, atomically (one round trip). Acceptance time from
# Redis's own clock, so every record is ordered like the queue.
# KEYS: queue list, inflight zset, message hash, keys hash. ARGV: id, message, keys...
_PUBLISH = """
redis.replicate_commands()
local t = redis.call('TIME')
local score = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], score, ARGV[1])
for i = 3, #ARGV do redis.call('HSET', KEYS[4], ARGV[i], ARGV[1]) end
redis.call('LPUSH', KEYS[1], ARGV[2])
return score
"""
# A worker begins messages: count each delivery, advance the received mark.
# KEYS: inflight zset, attempts hash, received string. ARGV: ids...
_BEGIN = """
local top = tonumber(redis.call('GET', KEYS[3]) or '0')
local out = {}
for i = 1, #ARGV do
  out[i] = redis.call('HINCRBY', KEYS[2], ARGV[i], 1)
  local s = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if s and tonumber(s) > top then top = tonumber(s) end
end
redis.call('SET', KEYS[3], top)
return out
"""


@dataclass(frozen=True, slots=True)
class Keys:
    queue: str
    inflight: str
    message: str
    keys: str
    attempts: str
    received: str

    @classmethod
    def of(cls, queue: str) -> Keys:
        base = f"tokenledger:{{{queue}}}"
        return cls(queue, f"{base}:inflight", f"{base}:message", f"{base}:keys",
                   f"{base}:attempts", f"{base}:received")


class Record:
    """The in-flight record of one queue on one Redis (thread-safe: redis-py's pool)."""

    def __init__(self, client: Any, queue: str) -> None:
        self.client = client
        self.names = Keys.of(queue)
        self._publish = client.register_script(_PUBLISH)
        self._begin = client.register_script(_BEGIN)

    def publish(self, message_id: str, message: str, event_keys: list[str],
                client: Any = None) -> None:
        """Queue ``message`` and record it, in one atomic round trip (on ``client``, a
        pipeline, when given)."""
        n = self.names
        self._publish(keys=[n.queue, n.inflight, n.message, n.keys],
                      args=[message_id, message, *event_keys], client=client)

    def begin(self, message_ids: list[str]) -> list[int]:
        """A worker takes these messages: each one's delivery count, this one included."""
        if not message_ids:
            return []
        n = self.names
        return [int(c) for c in self._begin(keys=[n.inflight, n.attempts, n.received],
                                            args=message_ids)]

    def clear(self, message_ids: list[str], event_keys: list[str]) -> None:
        """Forget messages whose events are final (one round trip)."""
        if not message_ids:
            return
        n = self.names
        pipe = self.client.pipeline(transaction=False)
        pipe.zrem(n.inflight, *message_ids)
        pipe.hdel(n.message, *message_ids)
        pipe.hdel(n.attempts, *message_ids)
        if event_keys:
            pipe.hdel(n.keys, *event_keys)
        pipe.execute()

    def defer(self, event_keys: list[str], seconds: int = DEFERRED_SECONDS) -> None:
        """Keep ``event_keys`` pending for ``seconds`` although their message is cleared:
        refunds waiting for their charge are published again later, with a delay."""
        if event_keys:
            pipe = self.client.pipeline(transaction=False)
            for key in event_keys:
                pipe.set(self.deferred(key), 1, ex=seconds)
            pipe.execute()

    def deferred(self, event_key: str) -> str:
        return f"{self.names.keys}:deferred:{event_key}"

    def pending(self, event_key: str) -> bool:
        """Whether ``event_key`` was accepted and is not final yet."""
        pipe = self.client.pipeline(transaction=False)
        pipe.hexists(self.names.keys, event_key)
        pipe.exists(self.deferred(event_key))
        return any(pipe.execute())

    def size(self) -> int:
        return int(self.client.zcard(self.names.inflight))


_records: dict[tuple[str, str], Record] = {}


def record_for(settings: Any, queue: str | None = None) -> Record | None:
    """This process's record of ``queue`` (default: the ledger's), or None when the
    broker is not Redis (RabbitMQ keeps unacknowledged messages itself)."""
    from tokenledger.queue.config import is_redis, redis_client

    broker = settings.broker()
    if not is_redis(broker):
        return None
    queue = queue or settings.queue
    record = _records.get((broker, queue))
    if record is None:
        shared = next((r.client for (b, _), r in _records.items() if b == broker), None)
        record = _records[(broker, queue)] = Record(
            shared or redis_client(broker, timeout=10), queue)
    return record


def forget(message_ids: list[str], settings: Any) -> None:
    """Take back deliveries that ended without a verdict (the database was away): they
    do not count towards ``MAX_DELIVERIES``."""
    record = record_for(settings)
    if record is not None and message_ids:
        pipe = record.client.pipeline(transaction=False)
        for message_id in message_ids:
            pipe.hincrby(record.names.attempts, message_id, -1)
        pipe.execute()


@dataclass(slots=True)
class ReconcileReport:
    """What one reconciler pass found among records older than the bound."""

    examined: int = 0
    cleared: int = 0
    requeued: int = 0
    held: int = 0
    waiting: int = 0
    orphaned: int = 0
    skipped: bool = False  # another process holds this interval's pass


def reconcile(record: Record, final_keys: Any, *, stale_after: float = STALE_AFTER_SECONDS,
              visibility_timeout: float = 300, limit: int = RECONCILE_BATCH,
              interval: float = RECONCILE_SECONDS, atomic: bool = False) -> ReconcileReport:
    """Clear the final, queue again the lost, among records older than ``stale_after``.

    ``final_keys(keys)`` answers which of ``keys`` have a stored outcome or a dead letter.
    One pass per ``interval`` across every process (a Redis lock); two at once would still
    be safe: clearing is idempotent, and a message queued twice is a duplicate delivery,
    which idempotency absorbs. ``atomic``: the queue is taken by the intake, which never
    loses a message between the queue and a worker; only final records are cleared.
    """
    from tokenledger.queue.message import events_of

    client, n = record.client, record.names
    if not client.set(f"{n.inflight}:reconciling", 1, nx=True, px=int(interval * 900)):
        return ReconcileReport(skipped=True)
    seconds, micros = client.time()
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    stale = client.zrangebyscore(n.inflight, "-inf", now_ms - stale_after * 1000,
                                 start=0, num=limit, withscores=True)
    report = ReconcileReport(examined=len(stale))
    if not stale:
        return report
    received = float(client.get(n.received) or 0)
    queued = int(client.llen(n.queue))
    ids = [m.decode() if isinstance(m, bytes) else m for m, _ in stale]
    messages = client.hmget(n.message, ids)
    parsed: list[tuple[str, float, Any, list[str]]] = []
    for (_, score), message_id, raw in zip(stale, ids, messages, strict=True):
        if raw is None:  # cleared meanwhile, or its message was never stored
            report.orphaned += 1
            client.zrem(n.inflight, message_id)
            continue
        try:
            keys = [e["key"] for e in events_of(raw) if isinstance(e, dict)
                    and isinstance(e.get("key"), str)]
        except ValueError:
            keys = []
        parsed.append((message_id, score, raw, keys))
    done = final_keys([k for *_, keys in parsed for k in keys])
    for message_id, score, raw, keys in parsed:
        if keys and all(k in done for k in keys):
            record.clear([message_id], keys)
            report.cleared += 1
            continue
        if atomic:
            report.waiting += 1  # in the queue or a worker's hands (queue.intake)
            continue
        tag = json.loads(raw).get("properties", {}).get("delivery_tag")
        held = tag is not None and client.hexists("unacked", tag)
        overdue = now_ms - score > (visibility_timeout + stale_after) * 1000
        if held and not overdue:
            report.held += 1  # a worker has it; kombu redelivers it if that worker died
        elif not held and score > received and queued:
            # The queue is first in, first out: no worker has taken anything newer yet.
            report.waiting += 1
        else:
            # Taken by a worker that died before kombu recorded it, or held far beyond
            # the visibility timeout: queued again as it was.
            pipe = client.pipeline(transaction=True)
            pipe.lpush(n.queue, raw)
            pipe.zadd(n.inflight, {message_id: now_ms})
            pipe.execute()
            report.requeued += 1
            log.warning("queued again an accepted message that no worker holds",
                        extra={"message_id": message_id, "events": len(keys)})
    return report
