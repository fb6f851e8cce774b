"""The ledger queue on Redis, taken in bulk: what makes single events cost what batches do.

kombu's Redis transport spends three round trips on every message (``BRPOP``, a
``MULTI/EXEC`` to record it as unacknowledged, another to acknowledge it) in the worker's
main process; with one event per message that, not the ledger, limits a worker. The
worker takes the ledger queue (``TOKENLEDGER_QUEUE``) itself instead, with one script
call for many messages:

- **take**: up to ``n`` messages leave the queue and enter this worker's ``taken`` hash
  (message id -> message) in the same script, so a message is always in the queue, in
  some worker's hash, or final; there is no moment where a crash loses it;
- the messages in hand go to the pool in groups (``queue.coalesce``), applied in one
  transaction each;
- **ack**: after the commit, one call removes the group's messages from the hash (and
  their in-flight record, ``queue.inflight``);
- **requeue**: a group that could not be applied (the database away) goes back to the
  consuming end of the queue;
- each worker refreshes ``alive:<worker>`` every few seconds; the reconciler
  (``ApplyEvents.housekeeping``) gives the messages of a worker whose key expired (killed,
  even ``kill -9``) back to the queue. An accepted event is therefore final within
  ``ALIVE_SECONDS`` + ``RECONCILE_SECONDS`` of its worker's death, plus the time to apply.

Every other task (renewal chunks, sweeps, the deferred refunds) travels on
``<queue>.tasks`` through Celery's own consumer.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

log = logging.getLogger("tokenledger.worker")

ALIVE_SECONDS = 15
HEARTBEAT_SECONDS = 3
TAKE_MAX = 1000  # messages per script call
# Seconds between takes: right after a take; while messages arrived within the last
# ACTIVE_SECONDS (a message waits at most POLL_ACTIVE for its take, at ~1,000 empty
# script calls a second); then backing off to POLL_MAX when the queue has gone quiet.
POLL_MIN, POLL_ACTIVE, POLL_MAX = 0.0005, 0.001, 0.01
ACTIVE_SECONDS = 2.0

# KEYS: queue, taken hash, owner hash, attempts hash. ARGV: n, worker.
# Returns a flat list: message, id, events, deliveries, ... for each message taken.
_TAKE = """
local items = redis.call('RPOP', KEYS[1], tonumber(ARGV[1]))
if not items then return {} end
local out = {}
for i = 1, #items do
  local item = items[i]
  local ok, msg = pcall(cjson.decode, item)
  local id, events = nil, 1
  if ok and type(msg) == 'table' and type(msg['headers']) == 'table' then
    id = msg['headers']['id']
    local n = msg['headers']['events']
    if type(n) == 'number' and n > 0 then events = n end
  end
  if type(id) ~= 'string' or id == '' then id = 'sha1:' .. redis.sha1hex(item) end
  redis.call('HSET', KEYS[2], id, item)
  redis.call('HSET', KEYS[3], id, ARGV[2])
  local count = redis.call('HINCRBY', KEYS[4], id, 1)
  out[#out + 1] = item
  out[#out + 1] = id
  out[#out + 1] = events
  out[#out + 1] = count
end
return out
"""

# KEYS: queue, taken hash, owner hash. ARGV: ids (back to the consuming end, in order).
_REQUEUE = """
local n = 0
for i = #ARGV, 1, -1 do
  local item = redis.call('HGET', KEYS[2], ARGV[i])
  if item then
    redis.call('RPUSH', KEYS[1], item)
    redis.call('HDEL', KEYS[2], ARGV[i])
    redis.call('HDEL', KEYS[3], ARGV[i])
    n = n + 1
  end
end
return n
"""

# KEYS: queue, taken hash of a dead worker, owner hash, workers set. ARGV: worker.
_RESCUE = """
local all = redis.call('HGETALL', KEYS[2])
for i = 1, #all, 2 do
  redis.call('RPUSH', KEYS[1], all[i + 1])
  redis.call('HDEL', KEYS[3], all[i])
end
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[4], ARGV[1])
return #all / 2
"""


class Names:
    def __init__(self, queue: str) -> None:
        base = f"tokenledger:{{{queue}}}"
        self.queue = queue
        self.owner = f"{base}:owner"
        self.attempts = f"{base}:attempts"
        self.workers = f"{base}:workers"
        self.base = base

    def taken(self, worker: str) -> str:
        return f"{self.base}:taken:{worker}"

    def alive(self, worker: str) -> str:
        return f"{self.base}:alive:{worker}"


class Intake:
    """One worker's bulk consumer of the ledger queue (runs in the worker's event loop)."""

    def __init__(self, client: Any, queue: str, grouper: Any, timer: Any,
                 node: str | None = None) -> None:
        self.client = client
        self.names = Names(queue)
        self.grouper = grouper
        self.timer = timer
        # The Celery node name first (``tokenledger status`` matches workers by it).
        node = node or socket.gethostname()
        self.worker = f"{node}|{os.getpid()}|{os.urandom(3).hex()}"
        self.taken_key = self.names.taken(self.worker)
        self._take = client.register_script(_TAKE)
        self._requeue = client.register_script(_REQUEUE)
        self._interval = POLL_MIN
        self._last_take = 0.0
        self._beat = 0.0
        self._entry: Any = None
        self._stopped = False
        self.heartbeat(force=True)
        client.sadd(self.names.workers, self.worker)

    def start(self) -> None:
        self._entry = self.timer.call_after(0.0, self.tick)

    def heartbeat(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._beat >= HEARTBEAT_SECONDS:
            self.client.set(self.names.alive(self.worker), 1, px=ALIVE_SECONDS * 1000)
            self._beat = now

    def tick(self) -> None:
        self._entry = None
        if self._stopped:
            return
        took = 0
        try:
            self.heartbeat()
            want = self.grouper.wanted()
            if want > 0:
                took = self.take(min(want, TAKE_MAX))
        except Exception as exc:  # noqa: BLE001 - Redis away: tried again shortly
            log.warning("taking from %s failed: %s", self.names.queue, exc)
            self._interval = 1.0
        else:
            self._interval = self._next_interval(took)
        if not self._stopped:
            self._entry = self.timer.call_after(self._interval, self.tick)

    def _next_interval(self, took: int) -> float:
        now = time.monotonic()
        if took:
            self._last_take = now
            return POLL_MIN
        if now - self._last_take < ACTIVE_SECONDS:
            return POLL_ACTIVE
        return min(POLL_MAX, max(POLL_ACTIVE, self._interval * 2))

    def take(self, n: int) -> int:
        n_ = self.names
        flat = self._take(keys=[n_.queue, self.taken_key, n_.owner, n_.attempts],
                          args=[n, self.worker])
        for i in range(0, len(flat), 4):
            item, message_id, events, count = flat[i:i + 4]
            self.grouper.take(_text(message_id), item, int(events), int(count),
                              self.ack, self.requeue)
        if flat:
            self.grouper.flush()
        return len(flat) // 4

    def ack(self, message_ids: list[str]) -> None:
        """Forget messages whose group committed (one round trip)."""
        if not message_ids:
            return
        pipe = self.client.pipeline(transaction=False)
        pipe.hdel(self.taken_key, *message_ids)
        pipe.hdel(self.names.owner, *message_ids)
        pipe.execute()

    def requeue(self, message_ids: list[str]) -> None:
        """Give messages back to the consuming end of the queue (their deliveries stay
        counted; a group that waited out the database uncounts its own)."""
        if message_ids:
            n_ = self.names
            self._requeue(keys=[n_.queue, self.taken_key, n_.owner], args=message_ids)

    def stop(self) -> None:
        """Stop taking; what is taken and not yet in the pool goes back to the queue."""
        self._stopped = True
        if self._entry is not None:
            self._entry.cancel()
        try:
            self.requeue(self.grouper.release_buffer())
        except Exception as exc:  # noqa: BLE001 - the reconciler rescues them later
            log.warning("could not hand back the buffered messages: %s", exc)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def rescue_dead_workers(client: Any, queue: str) -> int:
    """Give the messages of every worker whose heartbeat expired back to the queue;
    how many. Safe to run anywhere, any number of times."""
    n = Names(queue)
    rescue = client.register_script(_RESCUE)
    total = 0
    for raw in client.smembers(n.workers):
        worker = _text(raw)
        if client.exists(n.alive(worker)):
            continue
        moved = int(rescue(keys=[n.queue, n.taken(worker), n.owner, n.workers], args=[worker]))
        if moved:
            log.warning("gave %d message(s) of stopped worker %s back to %s", moved, worker,
                        queue)
        total += moved
    return total


def held(client: Any, queue: str, message_id: str) -> bool:
    """Whether a worker holds the message now."""
    return bool(client.hexists(Names(queue).owner, message_id))


def live_nodes(client: Any, queue: str) -> set[str]:
    """The Celery node names of the workers whose intake takes ``queue`` now."""
    n = Names(queue)
    workers = [_text(w) for w in client.smembers(n.workers)]
    if not workers:
        return set()
    alive = client.mget([n.alive(w) for w in workers])
    return {w.split("|", 1)[0] for w, a in zip(workers, alive, strict=True) if a}
