"""Balance notifications: ``balance_changed`` for every committed change, ``balance_low``
once per crossing of the plan's threshold — published only after the commit.

Inside a unit of work, a writer of balances calls :func:`stage` with the batch's
``balance_changes``. That works out low-balance crossings (the state lives in the
``low_balance_state`` table, written in the same transaction, so it is right across
processes and never advances for rolled-back work) and registers a SQLAlchemy
``after_commit`` hook on the session. The hook is the only place anything is published:
a rolled-back transaction never fires it.

Delivery is at most once (Redis pub/sub has no replay): consumers treat a notice as
"re-read this balance" and keep the highest ``ledger_seq`` per user. Channels are
``<prefix>balance_changed`` and ``<prefix>balance_low``; every message is one JSON object
with an ``event`` field. Python callbacks registered with :func:`subscribe` run in the
process that committed; with the embedded broker (no Redis) that is the only path.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import redis
from sqlalchemy import BigInteger, ForeignKey, String, any_, bindparam, delete, event, func, select
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Mapped, Session, mapped_column

from tokenledger.catalog import Catalog
from tokenledger.config import Settings
from tokenledger.db import insert_for
from tokenledger.logs import mask_url
from tokenledger.models import Account, Base, Timestamp

log = logging.getLogger("tokenledger.notify")

BALANCE_CHANGED = "balance_changed"
BALANCE_LOW = "balance_low"
EVENTS = (BALANCE_CHANGED, BALANCE_LOW)
_ENCODER = json.JSONEncoder(separators=(",", ":"))


class LowBalanceState(Base):
    """An account that was told it is low and has not gone back above its threshold.

    A row exists exactly while the account is "below": inserting it is the crossing that
    publishes ``balance_low``; deleting it re-arms the alert. Keyed by user_id because
    that is what a batch's balance changes carry: one cheap probe per batch.
    """

    __tablename__ = "low_balance_state"
    user_id: Mapped[str] = mapped_column(
        String(128), ForeignKey("accounts.user_id", ondelete="CASCADE"), primary_key=True)
    threshold: Mapped[int] = mapped_column(BigInteger)
    balance: Mapped[int] = mapped_column(BigInteger)
    ledger_seq: Mapped[int] = mapped_column(BigInteger)
    since: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())


@dataclass(frozen=True, slots=True)
class BalanceNotice:
    """What subscribers receive. ``threshold`` is set for ``balance_low`` only."""

    event: str
    user_id: str
    balance: int
    ledger_seq: int
    threshold: int | None = None

    def to_json(self) -> str:
        data: dict[str, Any] = {"event": self.event, "user_id": self.user_id,
                                "balance": self.balance, "ledger_seq": self.ledger_seq}
        if self.threshold is not None:
            data["threshold"] = self.threshold
        return _ENCODER.encode(data)

    @classmethod
    def from_json(cls, raw: str | bytes) -> BalanceNotice:
        data = json.loads(raw)
        return cls(str(data["event"]), str(data["user_id"]), int(data["balance"]),
                   int(data["ledger_seq"]),
                   None if data.get("threshold") is None else int(data["threshold"]))


@dataclass(frozen=True, slots=True)
class BulkChanges:
    """Many accounts' balance changes from one set-based writer, one per user, with each
    ``balance_changed`` message already encoded by the database (see
    :func:`message_sql`): a million-account renewal sends a million notices, and building
    them one Python object at a time cost more than the renewal's own SQL. The messages
    travel as one string, a line each (JSON never holds a raw newline): a slice of 2,000
    accounts cost its worker 4.5 ms of CPU as 2,000-element arrays and Redis arguments,
    0.8 ms as one string."""

    messages: str  # one message per line
    # The changes whose low-balance state may change (the account is marked low, or at or
    # below its plan's threshold), when the writer worked them out in its own statement;
    # None: :func:`stage_bulk` finds them.
    concerned: list[BalanceNotice] | None = None

    @classmethod
    def of(cls, changes: Iterable[Any]) -> BulkChanges:
        """From BalanceChange-like objects, encoded in Python (the portable path)."""
        notices = [BalanceNotice(BALANCE_CHANGED, c.user_id, c.balance, c.ledger_seq)
                   for c in changes]
        return cls("\n".join(n.to_json() for n in notices))

    @property
    def count(self) -> int:
        return self.messages.count("\n") + 1 if self.messages else 0

    def notices(self) -> list[BalanceNotice]:
        """The changes as objects, decoded from the messages."""
        return [BalanceNotice.from_json(line) for line in self.messages.split("\n") if line]


def message_sql(user_id: str, balance: str, seq: str) -> str:
    """A PostgreSQL expression encoding ``balance_changed`` exactly as
    :meth:`BalanceNotice.to_json` does, from three SQL expressions."""
    return (f"'{{\"event\":\"{BALANCE_CHANGED}\",\"user_id\":' || to_json({user_id})::text"
            f" || ',\"balance\":' || ({balance}) || ',\"ledger_seq\":' || ({seq}) || '}}'")


Callback = Callable[[BalanceNotice], Any]

# -- in-process subscribers --------------------------------------------------------------

_subscribers: list[tuple[Callback, frozenset[str]]] = []
_subscribers_lock = threading.Lock()


def subscribe(callback: Callback, events: Iterable[str] = EVENTS) -> Callable[[], None]:
    """Call ``callback`` for every notice committed in this process; returns unsubscribe."""
    entry = (callback, frozenset(events))
    with _subscribers_lock:
        _subscribers.append(entry)

    def unsubscribe() -> None:
        with _subscribers_lock:
            if entry in _subscribers:
                _subscribers.remove(entry)

    return unsubscribe


def _dispatch_local(notices: list[BalanceNotice]) -> None:
    with _subscribers_lock:
        subscribers = list(_subscribers)
    for callback, events in subscribers:
        for notice in notices:
            if notice.event in events:
                try:
                    callback(notice)
                except Exception:  # noqa: BLE001 - a subscriber's bug must not spread
                    log.exception("balance subscriber %r failed", callback)


# -- Redis -------------------------------------------------------------------------------


def redis_url(settings: Settings) -> str | None:
    """The Redis that carries notifications, or None (in-process subscribers only)."""
    if not settings.notify_enabled:
        return None
    if settings.notify_redis_url:
        return settings.notify_redis_url
    if settings.broker_url.startswith(("redis://", "rediss://")):
        return settings.broker_url
    return None


def channel(settings: Settings, event_name: str) -> str:
    return f"{settings.notify_channel_prefix}{event_name}"


_clients: dict[str, redis.Redis] = {}
_clients_lock = threading.Lock()


def _redis(url: str) -> redis.Redis:
    # redis-py's pool notices a fork and reconnects in the child, so one per URL is safe.
    with _clients_lock:
        client = _clients.get(url)
        if client is None:
            client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2,
                                          health_check_interval=30)
            _clients[url] = client
        return client


def publish(settings: Settings, notices: list[BalanceNotice]) -> None:
    """Tell in-process subscribers and the Redis channels. Never raises: the work is
    already committed, and a lost notice only delays a cache refresh."""
    if not notices:
        return
    from tokenledger import metrics

    _dispatch_local(notices)
    url = redis_url(settings)
    if url is not None:
        # One scripted command: each line is a channel's number and a message, so the
        # notices keep their order across channels, and the client packs one argument
        # and reads one reply instead of one per notice.
        channels: dict[str, str] = {}
        lines = []
        for notice in notices:
            tag = channels.get(notice.event)
            if tag is None:
                tag = channels[notice.event] = str(len(channels) + 1)
            lines.append(tag + notice.to_json())
        try:
            script = _redis(url).register_script(_PUBLISH_TAGGED)
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


# PUBLISH each line of ARGV[1] to the channel KEYS[1]: one command for thousands of notices.
_PUBLISH_LINES = ("local n = 0 for m in string.gmatch(ARGV[1], '[^\\n]+') do"
                  " redis.call('PUBLISH', KEYS[1], m) n = n + 1 end return n")


# PUBLISH each line of ARGV[1], but its first character, to KEYS[that character] (1-9).
_PUBLISH_TAGGED = ("local n = 0 for m in string.gmatch(ARGV[1], '[^\\n]+') do"
                   " redis.call('PUBLISH', KEYS[tonumber(string.sub(m, 1, 1))],"
                   " string.sub(m, 2)) n = n + 1 end return n")


def publish_bulk(settings: Settings, bulk: BulkChanges) -> None:
    """:func:`publish` for a :class:`BulkChanges`: in-process subscribers (if any) get
    notices; Redis gets the encoded messages in a few scripted PUBLISH loops. Never
    raises."""
    from tokenledger import metrics

    if not bulk.count:
        return
    if _subscribers:
        _dispatch_local(bulk.notices())
    url = redis_url(settings)
    if url is not None:
        try:
            script = _redis(url).register_script(_PUBLISH_LINES)
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

    def put(self, settings: Settings, notices: list[BalanceNotice] | BulkChanges) -> None:
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
            bulks: list[tuple[Settings, BulkChanges]] = []
            taken = 0
            while item is not None:
                taken += 1
                settings, notices = item
                if isinstance(notices, BulkChanges):
                    bulks.append((settings, notices))
                else:
                    batches.setdefault(id(settings), (settings, []))[1].extend(notices)
                try:
                    item = q.get_nowait()
                except queue.Empty:
                    item = None
            for settings, bulk in bulks:
                try:
                    publish_bulk(settings, bulk)
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


def publish_soon(settings: Settings, notices: list[BalanceNotice]) -> None:
    """:func:`publish` from a background thread, for committed notices whose writer should
    not wait for Redis (the token-process start). Same at-most-once delivery; notices of
    one process keep their order."""
    if notices:
        _publisher.put(settings, notices)


def flush_published(timeout: float = 5.0) -> bool:
    """Wait for :func:`publish_soon`'s backlog to be published (True) or ``timeout``."""
    return _publisher.flush(timeout)


atexit.register(flush_published, 2.0)


# -- staging inside a unit of work ---------------------------------------------------------

_PENDING = "tokenledger.balance_notices"
_SETTINGS = "tokenledger.balance_notices_settings"
_SOON = "tokenledger.balance_notices_soon"
_PENDING_BULK = "tokenledger.balance_notices_bulk"


def stage(session: Session, settings: Settings, changes: Iterable[Any],
          catalog: Catalog, now: datetime) -> list[BalanceNotice]:
    """Record low-balance crossings in this transaction and publish every notice after
    it commits (never if it rolls back). ``changes`` are BalanceChange-like objects
    (user_id, balance, ledger_seq) for accounts this transaction has locked."""
    latest: dict[str, Any] = {}
    for change in changes:
        prior = latest.get(change.user_id)
        if prior is None or change.ledger_seq > prior.ledger_seq:
            latest[change.user_id] = change
    if not latest:
        return []
    notices = [BalanceNotice(BALANCE_CHANGED, c.user_id, c.balance, c.ledger_seq)
               for c in latest.values()]
    notices += _low_balance_crossings(session, latest, catalog, now)
    _queue(session, settings, notices)
    return notices


def stage_bulk(session: Session, settings: Settings, bulk: BulkChanges, catalog: Catalog,
               now: datetime) -> None:
    """:func:`stage` for a set-based writer's :class:`BulkChanges` (accounts it has
    locked, one change each): low-balance state is kept for the few accounts it concerns
    (marked low, or at or below a threshold), and every notice is handed to the
    background publisher once the transaction commits."""
    if not bulk.count:
        return
    if bulk.concerned is not None:
        concerned = {n.user_id: n for n in bulk.concerned}
    else:
        ceiling = max((p.low_balance_threshold for p in catalog.plans.values()
                       if p.low_balance_threshold is not None), default=None)
        changes = bulk.notices()
        marked = set(session.scalars(select(LowBalanceState.user_id).where(
            _user_in(session, LowBalanceState.user_id, [n.user_id for n in changes]))))
        concerned = {n.user_id: n for n in changes
                     if n.user_id in marked or (ceiling is not None and n.balance <= ceiling)}
    lows = _low_balance_crossings(session, concerned, catalog, now) if concerned else []
    session.info.setdefault(_PENDING_BULK, []).append(bulk)
    _queue(session, settings, lows, soon=True)
    session.info[_SETTINGS] = settings
    session.info[_SOON] = True


def _queue(session: Session, settings: Settings, notices: list[BalanceNotice],
           soon: bool = False) -> None:
    # Published by _after_commit, never if the transaction rolls back.
    if not notices:
        return
    session.info.setdefault(_PENDING, []).extend(notices)
    session.info[_SETTINGS] = settings
    if soon:
        session.info[_SOON] = True


# The balance changes of several locked accounts, as :func:`stage` sees them, as
# data-modifying CTEs for the statement that writes their entries (a CTE named ``seq``
# answering each written account's ``account_id`` and newest entry id ``seq``): at or
# below the threshold, mark the account unless it is marked already (a row in ``low`` is
# the crossing, its ``user_id`` returned); above it (or with no threshold), re-arm.
# Nothing happens to an account without an entry (``low_balance_params`` is given only
# accounts that have one, and marking joins ``seq``).
LOW_BALANCE_CTES = (
    "low AS (INSERT INTO low_balance_state (user_id, threshold, balance, ledger_seq, since)"
    " SELECT l.user_id, l.threshold, l.balance, seq.seq, %(low_now)s"
    " FROM json_to_recordset(%(low)s::json)"
    " AS l(user_id text, account_id bigint, threshold bigint, balance bigint)"
    " JOIN seq USING (account_id) ON CONFLICT DO NOTHING RETURNING user_id),"
    " rearm AS (DELETE FROM low_balance_state WHERE user_id = ANY(%(rearm)s::text[]))")


def low_balance_params(changes: list[tuple[str, int, int, int | None]], now: datetime
                       ) -> dict[str, Any]:
    """The parameters of ``LOW_BALANCE_CTES`` for ``(user_id, account_id, balance,
    threshold)`` of accounts whose entries the statement writes."""
    low, rearm = [], []
    for user_id, account_id, balance, threshold in changes:
        if _is_low(balance, threshold):
            low.append({"user_id": user_id, "account_id": account_id,
                        "threshold": threshold, "balance": balance})
        else:
            rearm.append(user_id)
    return {"low_now": now, "low": _ENCODER.encode(low), "rearm": rearm}


# Listeners on the Session class, installed once: registering them per session made
# SQLAlchemy rebuild the session's event dispatch every time, which cost a short
# transaction more than its own statements. Each only drains what its session staged.
@event.listens_for(Session, "after_commit")
def _after_commit(committed: Session) -> None:
    info = committed.info
    if _PENDING not in info and _PENDING_BULK not in info:
        return
    if committed.get_nested_transaction() is not None:
        return  # a savepoint was released; the outer transaction has not committed
    notices = info.pop(_PENDING, [])
    settings = info.pop(_SETTINGS)
    for bulk in info.pop(_PENDING_BULK, []):
        _publisher.put(settings, bulk)
    send = publish_soon if info.pop(_SOON, False) else publish
    send(settings, notices)


@event.listens_for(Session, "after_soft_rollback")
def _after_rollback(rolled_back: Session, transaction: Any) -> None:
    if _PENDING not in rolled_back.info and _PENDING_BULK not in rolled_back.info:
        return
    if transaction.nested or transaction.parent is not None:
        return  # a savepoint: the outer transaction may still commit
    dropped = len(rolled_back.info.pop(_PENDING, []))
    dropped += sum(b.count for b in rolled_back.info.pop(_PENDING_BULK, []))
    rolled_back.info.pop(_SETTINGS, None)
    rolled_back.info.pop(_SOON, None)
    if dropped:
        log.debug("dropped %d balance notice(s) of a rolled-back transaction", dropped)


def _user_in(session: Session, column: Any, user_ids: list[str]) -> Any:
    # One array parameter on PostgreSQL: a 1,000-event batch would otherwise bind (and
    # plan) 1,000 separate parameters for each probe.
    if session.get_bind().dialect.name == "postgresql":
        return column == any_(bindparam("user_ids", user_ids, type_=ARRAY(String)))
    return column.in_(user_ids)


def _low_balance_crossings(session: Session, latest: dict[str, Any], catalog: Catalog,
                           now: datetime) -> list[BalanceNotice]:
    thresholds = {code: plan.low_balance_threshold for code, plan in catalog.plans.items()
                  if plan.low_balance_threshold is not None}
    # Accounts currently marked low (usually few): re-arm those that went back above.
    marked = {row.user_id: row.plan_code for row in session.execute(
        select(LowBalanceState.user_id, Account.plan_code)
        .join(Account, Account.user_id == LowBalanceState.user_id)
        .where(_user_in(session, LowBalanceState.user_id, list(latest))))}
    rearm = [uid for uid, plan in marked.items()
             if not _is_low(latest[uid].balance, thresholds.get(plan))]
    if rearm:
        session.execute(delete(LowBalanceState)
                        .where(_user_in(session, LowBalanceState.user_id, rearm)))
    # Candidates for a new crossing: not marked and at/below the highest threshold.
    ceiling = max(thresholds.values(), default=None)
    candidates = [uid for uid, c in latest.items()
                  if uid not in marked and ceiling is not None and c.balance <= ceiling]
    if not candidates:
        return []
    notices: list[BalanceNotice] = []
    rows: list[dict[str, Any]] = []
    for row in session.execute(select(Account.user_id, Account.plan_code)
                               .where(_user_in(session, Account.user_id, candidates))):
        change = latest[row.user_id]
        threshold = thresholds.get(row.plan_code)
        if threshold is not None and _is_low(change.balance, threshold):
            rows.append({"user_id": row.user_id, "threshold": threshold,
                         "balance": change.balance, "ledger_seq": change.ledger_seq,
                         "since": now})
            notices.append(BalanceNotice(BALANCE_LOW, row.user_id, change.balance,
                                         change.ledger_seq, threshold))
    if rows:
        session.execute(insert_for(session)(LowBalanceState).on_conflict_do_nothing(), rows)
    return notices


def _is_low(balance: int, threshold: int | None) -> bool:
    return threshold is not None and balance <= threshold


# -- the SDK's subscriber thread -----------------------------------------------------------


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
            client = redis.Redis.from_url(self.url, socket_connect_timeout=2,
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
