"""Token-process starts from the API's event loop, in groups, in two round trips each.

Each connection is a :class:`~tokenledger.db.pipeline.PipeConnection` (libpq pipeline
mode, driven from the event loop), and the starts that arrive together go in one group:

1. ``BEGIN`` + the reads (the accounts' locks, their wallets, the stored outcomes of the
   starts' keys), sent at once;
2. each start's decision in Python (``service.decide``), under its account's lock;
3. one write for every start that holds, + ``COMMIT``, sent at once; the answers are
   given once the commit is durable.

The decisions and statements are the service's, the same the SDK's start runs one by
one in a unit of work: same rows, same arithmetic, same answers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import psycopg

from tokenledger.catalog.service import REFRESH_SECONDS, Catalog
from tokenledger.config import Settings
from tokenledger.db.engine import libpq_url
from tokenledger.db.errors import QUICK, Failure, classify, stale_statements
from tokenledger.db.pipeline import BEGIN, COMMIT, ROLLBACK, ConnectionLost, PipeConnection
from tokenledger.messages import StartRequest
from tokenledger.notify import publisher
from tokenledger.notify.service import BalanceNotice
from tokenledger.ops.metrics import START_GROUP_SIZE
from tokenledger.results import StartResult
from tokenledger.timeutil import utcnow
from tokenledger.tokenprocess import service
from tokenledger.webhooks import service as webhooks

log = logging.getLogger("tokenledger.tokenprocess.pool")

# Committed starts' notices are handed to the publisher thread together, at most this
# long after the first of them committed: one wake-up of that thread and one Redis call
# for all of them, instead of one each (docs/performance.md).
NOTIFY_BATCH_SECONDS = 0.010
APPLICATION_NAME = "tokenledger-start"
# Starts in one group (one transaction): enough to share a round trip's cost among all
# the starts a busy API process has in flight, few enough to keep the accounts' locks
# short.
MAX_GROUP = 32


@dataclass(slots=True, eq=False)
class _Pending:
    """A start waiting for, or being run in, a group."""

    request: StartRequest
    key: str
    future: asyncio.Future[StartResult]
    attempts: int = 0
    alone: bool = False  # its group failed: tried again in a group of its own


class StartPool:
    """A start's connections for one API process, and the catalog it decides with.

    Starts are run in groups: the starts that arrived while the connections were busy
    (or in the same turn of the event loop) go together, up to ``MAX_GROUP`` on distinct
    accounts and keys, through one set of statements and one commit (the service's
    statements take arrays). PostgreSQL spends most of a start's time per statement and
    per commit, not per row, so under load a group of eight costs it little more than
    one start; with a connection free, a start still goes at once, alone. A group that
    fails as a whole (a lost connection, a deadlock, a key raced by another group) is
    tried again one start at a time, so one start's failure is never another's.
    """

    def __init__(self, settings: Settings, size: int) -> None:
        self.settings = settings
        self.size = size
        conninfo = libpq_url(settings.ledger_url())
        # Told apart from other connections in pg_stat_activity.
        self.conninfo = conninfo + ("&" if "?" in conninfo else "?") + \
            f"application_name={APPLICATION_NAME}"
        self._idle: list[PipeConnection] = []
        self._opened = 0
        self._queue: deque[_Pending] = deque()
        self._dispatching = False
        self._groups: set[asyncio.Task[None]] = set()
        self._busy_users: set[str] = set()  # of the running groups
        self._busy_keys: set[str] = set()
        self._closed = False
        self._catalog: tuple[Catalog, float] | None = None
        self._refresh: asyncio.Future[Catalog] | None = None
        self._outbox: list[BalanceNotice] = []

    # -- connections ------------------------------------------------------------------

    def _release(self, conn: PipeConnection) -> None:
        if conn.idle:
            self._idle.append(conn)
        else:
            self._opened -= 1
            asyncio.get_running_loop().create_task(conn.close())
        self._dispatch_soon()

    async def _reset(self, conn: PipeConnection) -> None:
        """Roll back whatever a failed group left open, or drop the connection."""
        try:
            if not conn.broken and not conn.idle:
                await conn.roundtrip([ROLLBACK])
        except psycopg.Error:
            log.warning("dropping a start connection that could not roll back")
        except asyncio.CancelledError:
            conn.abandon()
            raise
        finally:
            self._release(conn)

    async def close(self) -> None:
        """Finish the running groups, refuse the waiting starts, close the connections."""
        self._closed = True
        if self._groups:
            await asyncio.gather(*self._groups, return_exceptions=True)
        waiting, self._queue = list(self._queue), deque()
        self._failed(waiting, ConnectionLost("the start pool was closed"))
        self._send_outbox()
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.close()

    # -- notices ----------------------------------------------------------------------

    def _announce(self, notices: list[BalanceNotice]) -> None:
        """Publish committed notices soon (``NOTIFY_BATCH_SECONDS``), in commit order."""
        if not notices:
            return
        if not self._outbox:
            asyncio.get_running_loop().call_later(NOTIFY_BATCH_SECONDS, self._send_outbox)
        self._outbox.extend(notices)

    def _send_outbox(self) -> None:
        notices, self._outbox = self._outbox, []
        publisher.publish_soon(self.settings, notices)

    # -- the catalog ------------------------------------------------------------------

    async def catalog(self) -> Catalog:
        """The stored catalog, re-read (off the loop) at most every REFRESH_SECONDS."""
        cached = self._catalog
        if cached is not None and time.monotonic() - cached[1] < REFRESH_SECONDS:
            return cached[0]
        if self._refresh is None:
            self._refresh = asyncio.ensure_future(asyncio.get_running_loop().run_in_executor(
                None, _load_catalog, self.settings))
        refresh = self._refresh
        if cached is not None and not refresh.done():
            return cached[0]  # a newer one is on its way; this one is at most a tick old
        try:
            catalog = await asyncio.shield(refresh)  # other groups may await it too
        finally:
            if self._refresh is refresh:
                self._refresh = None
        self._catalog = (catalog, time.monotonic())
        return catalog

    # -- the start --------------------------------------------------------------------

    async def start(self, request: StartRequest, key: str | None = None) -> StartResult:
        """``service.start`` on this pool: the same answers, rows and notices.

        Cancelled while still waiting for its group, the start never runs; once in a
        running group, it completes (or not) with the group, unanswered.
        """
        if self._closed:
            raise ConnectionLost("the start pool was closed")
        # One hold key for every attempt: an attempt whose commit is in doubt (the
        # connection broke after the commit was sent) is found by the next one, which
        # answers its stored outcome instead of holding twice.
        pending = _Pending(request, key or service.new_hold_key(),
                           asyncio.get_running_loop().create_future())
        self._queue.append(pending)
        self._dispatch_soon()
        return await pending.future

    def _dispatch_soon(self) -> None:
        # At the end of this turn of the loop: the starts of every request read in it
        # can go in one group.
        if not self._dispatching and self._queue:
            self._dispatching = True
            asyncio.get_running_loop().call_soon(self._dispatch)

    def _dispatch(self) -> None:
        """Hand waiting starts to free connections, a group per connection."""
        self._dispatching = False
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        while self._queue:
            conn = None
            while self._idle and conn is None:
                conn = self._idle.pop()  # the most recently used: its pages are warm
                if conn.broken:
                    self._opened -= 1
                    conn = None
            if conn is None:
                if self._opened >= self.size:
                    return
                self._opened += 1  # connected by the group
            group = self._take()
            if not group:
                if conn is None:
                    self._opened -= 1
                else:
                    self._idle.append(conn)
                return
            task = loop.create_task(self._run(conn, group))
            self._groups.add(task)
            task.add_done_callback(self._groups.discard)

    def _take(self) -> list[_Pending]:
        """The next group: the first waiting start whose account and key no running
        group has, and after it (unless it must go alone) more such starts, each on
        another account with another key, up to ``MAX_GROUP``. So one account's starts
        run one after the other, in the order they came (a start waiting to be retried
        after a failure may be overtaken), never waiting on each other's locks."""
        queue, users, keys, group = self._queue, self._busy_users, self._busy_keys, []
        passed: list[_Pending] = []
        while queue and len(group) < MAX_GROUP:
            pending = queue.popleft()
            if pending.future.done():  # cancelled while waiting: never run
                continue
            if (group and pending.alone) or pending.request.user_id in users or pending.key in keys:
                passed.append(pending)  # after the group that has its account commits
                continue
            group.append(pending)
            users.add(pending.request.user_id)
            keys.add(pending.key)
            if pending.alone:
                break
        queue.extendleft(reversed(passed))
        return group

    async def _run(self, conn: PipeConnection | None, group: list[_Pending]) -> None:
        try:
            await self._run_group(conn, group)
        finally:
            for pending in group:
                self._busy_users.discard(pending.request.user_id)
                self._busy_keys.discard(pending.key)
            self._dispatch_soon()

    async def _run_group(self, conn: PipeConnection | None, group: list[_Pending]) -> None:
        try:
            if conn is None:
                try:
                    conn = await self._connect()
                except Exception as exc:
                    self._failed(group, exc)
                    return
            try:
                answers = await self._attempt(conn, group)
            except asyncio.CancelledError:
                conn.abandon()  # in an unknown state: never reused
                self._release(conn)
                raise
            except Exception as exc:
                if stale_statements(exc):
                    log.warning("dropping a start connection whose prepared statements no "
                                "longer fit the schema (%s)", exc)
                    conn.abandon()
                await self._reset(conn)
                self._retry(group, exc)
                return
            self._release(conn)
            notices: list[BalanceNotice] = []
            for pending, answer in answers:
                if isinstance(answer, service.ExpiredHolds):
                    self._start_releasing(pending)
                    continue
                if isinstance(answer, BaseException):
                    if not pending.future.done():
                        pending.future.set_exception(answer)
                    continue
                result, started = answer
                notices.extend(started)
                if not pending.future.done():
                    pending.future.set_result(result)
            self._announce(notices)
        except asyncio.CancelledError:
            self._failed(group, ConnectionLost(
                "the start was interrupted; whether it committed is unknown"))
            raise
        except Exception as exc:  # a bug here: answer it rather than leave starts waiting
            log.exception("a group of starts failed")
            self._failed(group, exc)

    def _start_releasing(self, pending: _Pending) -> None:
        """A start whose account has expired holds: ``service.start`` in a unit of work
        (off the loop) releases them under the account lock, then starts. Rare (the
        sweep releases most holds first), so it leaves the groups' fast path alone."""
        async def run() -> None:
            try:
                result = await asyncio.get_running_loop().run_in_executor(
                    None, _start_in_unit_of_work, self.settings, pending.request, pending.key)
            except Exception as exc:  # noqa: BLE001 - the start's answer
                if not pending.future.done():
                    pending.future.set_exception(exc)
                return
            if not pending.future.done():
                pending.future.set_result(result)

        task = asyncio.get_running_loop().create_task(run())
        self._groups.add(task)
        task.add_done_callback(self._groups.discard)

    async def _connect(self) -> PipeConnection:
        """A new connection for a group (``_dispatch`` counted it in ``_opened``)."""
        try:
            return await PipeConnection.connect(self.conninfo)
        except BaseException:
            self._opened -= 1
            raise

    async def _attempt(self, conn: PipeConnection, group: list[_Pending]
                       ) -> list[tuple[_Pending, service.Started | BaseException]]:
        """One transaction for the group: lock, decide each start, write, commit."""
        START_GROUP_SIZE.observe(len(group))
        catalog = await self.catalog()
        now = utcnow()
        rows = await conn.roundtrip([
            BEGIN, *service.reads([p.request.user_id for p in group], [p.key for p in group],
                                  now)])
        locked = service.Locked.of(rows[1:])
        answers: list[tuple[_Pending, service.Started | BaseException]] = []
        decided: list[tuple[_Pending, service.Decision]] = []
        for p in group:
            try:
                decided.append((p, service.decide(
                    locked, p.request, p.key, now=now,
                    hold_ttl_seconds=self.settings.hold_ttl_seconds, catalog=catalog)))
            except Exception as exc:  # noqa: BLE001 - this start's answer, not the group's
                answers.append((p, exc))
        decisions = [d for _, d in decided]
        statement = service.write(decisions, now)
        if statement is None:
            await conn.roundtrip([COMMIT])
            written: list[tuple[Any, ...]] = []
        else:
            written = (await conn.roundtrip([statement, COMMIT]))[0]
            if service.webhooks_written(written):
                webhooks.deliver_soon(self.settings)
        answers.extend(zip([p for p, _ in decided], service.finish(decisions, written),
                           strict=True))
        return answers

    def _retry(self, group: list[_Pending], exc: Exception) -> None:
        """After a group failed: each start again alone, or (alone) again or answered."""
        if len(group) > 1:  # which start it was is unknown: each on its own, first in line
            for pending in reversed(group):
                pending.alone = True
                self._queue.appendleft(pending)
            self._dispatch_soon()
            return
        pending = group[0]
        pending.attempts += 1
        if pending.attempts >= QUICK.attempts or classify(exc) is Failure.PERMANENT:
            if not pending.future.done():
                pending.future.set_exception(exc)
            return
        asyncio.get_running_loop().call_later(QUICK.delay(pending.attempts), self._again,
                                               pending)

    def _again(self, pending: _Pending) -> None:
        if self._closed:
            self._failed([pending], ConnectionLost("the start pool was closed"))
        elif not pending.future.done():
            self._queue.appendleft(pending)
            self._dispatch_soon()

    @staticmethod
    def _failed(group: list[_Pending], exc: BaseException) -> None:
        for pending in group:
            if not pending.future.done():
                pending.future.set_exception(exc)


def _start_in_unit_of_work(settings: Settings, request: StartRequest, key: str
                           ) -> StartResult:
    from tokenledger.db.uow import unit_of_work

    with unit_of_work(settings) as uow:
        return service.start(uow, request, key)


def _load_catalog(settings: Settings) -> Catalog:
    from tokenledger.db.uow import unit_of_work

    with unit_of_work(settings) as uow:
        return uow.catalog
