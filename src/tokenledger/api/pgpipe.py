"""Token-process starts on PostgreSQL from the API's event loop, in groups, in two round trips.

The start's transaction is short and its statements are fixed (``tokenprocess.pgstart``),
so what a start costs is mostly per round trip and per statement: a wake-up of the server
and of the client, the executor's start-up, a commit. Here each connection runs in
libpq's pipeline mode, driven straight from the event loop (no thread), and the starts
that arrive together go in one group (``StartPool``), which is:

1. ``BEGIN`` + the reads (the accounts' locks, their wallets, the stored outcomes of the
   starts' keys), sent at once;
2. each start's decision in Python (``pgstart.decide``), under its account's lock;
3. one write for every start that holds, + ``COMMIT``, sent at once; the answers are
   given once the commit is durable.

The server runs pipelined statements one after another, each with its own snapshot, so
the reads see what ``pgstart`` requires. psycopg's own pipeline waits for the socket to be
readable *or writable* and so spins while the server works; here the client sends
everything, flushes, and then only waits until the socket is readable.

Statements are prepared on each connection on first use (with the parameter types
psycopg chose for them) and run with generic plans: the write's plan is the same for
every group, and letting PostgreSQL re-plan it per execution (its default for the first
uses and whenever a custom plan looks cheaper) cost more than executing it.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg import pq
from psycopg.adapt import PyFormat, Transformer
from sqlalchemy.engine import make_url

from tokenledger import notify
from tokenledger.catalog import REFRESH_SECONDS, Catalog, current_catalog
from tokenledger.config import Settings
from tokenledger.db import unit_of_work
from tokenledger.metrics import START_GROUP_SIZE
from tokenledger.timeutil import utcnow
from tokenledger.tokenprocess import pgstart
from tokenledger.tokenprocess.service import StartResult, _checked, _start_digest

log = logging.getLogger("tokenledger.api.pgpipe")

BEGIN = ("BEGIN", {})
COMMIT = ("COMMIT", {})
ROLLBACK = ("ROLLBACK", {})
# Tries of one start, as ``service.run_start``: a deadlock, a serialization failure, a
# unique key raced by another start, or a lost connection (even during the commit).
ATTEMPTS = 3
# Committed starts' notices are handed to the publisher thread together, at most this
# long after the first of them committed: one wake-up of that thread and one Redis
# pipeline for all of them, instead of one each (which cost the API process about a
# tenth of its CPU and made the event loop wait for the GIL). At 2 ms the thread still
# held a fifth of the API's samples at ~1,200 starts/s (py-spy); at 10 ms the API spent
# 0.48-0.54 ms of CPU per start against 0.63-0.66 ms, in alternating bench runs.
NOTIFY_BATCH_SECONDS = 0.010
APPLICATION_NAME = "tokenledger-start"
# Starts in one group (one transaction): enough to share a round trip's cost among all
# the starts a busy API process has in flight, few enough to keep the accounts' locks
# short.
MAX_GROUP = 32

_PARAM = re.compile(r"%\((\w+)\)s")
_converted: dict[str, tuple[bytes, tuple[str, ...]]] = {}
_TUPLES_OK = pq.ExecStatus.TUPLES_OK
_COMMAND_OK = pq.ExecStatus.COMMAND_OK
_FATAL_ERROR = pq.ExecStatus.FATAL_ERROR
_PIPELINE_SYNC = pq.ExecStatus.PIPELINE_SYNC
_IDLE = pq.TransactionStatus.IDLE


def _convert(sql: str) -> tuple[bytes, tuple[str, ...]]:
    """``%(name)s`` placeholders as ``$n`` (one number per name), and the names in order."""
    found = _converted.get(sql)
    if found is None:
        names: list[str] = []

        def number(match: re.Match[str]) -> str:
            if match.group(1) not in names:
                names.append(match.group(1))
            return f"${names.index(match.group(1)) + 1}"

        found = _PARAM.sub(number, sql).encode(), tuple(names)
        _converted[sql] = found
    return found


class ConnectionLost(psycopg.OperationalError):
    """The connection broke; whether the last round trip's commit happened is unknown."""


class PipeConnection:
    """One PostgreSQL connection in pipeline mode, used by one coroutine at a time."""

    def __init__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self.conn = conn
        self.pgconn = conn.pgconn
        self.encoding = conn.info.encoding
        self.fd = self.pgconn.socket
        self.tx = Transformer(conn)
        self.prepared: dict[tuple[str, tuple[int, ...]], bytes] = {}
        self._names = 0  # statements named so far (a name is never reused)
        self.broken = False
        self._waiter: asyncio.Future[None] | None = None
        self._loop = asyncio.get_running_loop()
        self.pgconn.nonblocking = 1
        self.pgconn.enter_pipeline_mode()
        # Registered for the connection's lifetime (not per wait): the server closing an
        # idle connection is noticed at once, and a wait costs no epoll registration.
        self._loop.add_reader(self.fd, self._readable)

    @classmethod
    async def connect(cls, conninfo: str) -> PipeConnection:
        conn = await psycopg.AsyncConnection.connect(conninfo, autocommit=True)
        try:
            await conn.execute("SET plan_cache_mode = force_generic_plan")
            return cls(conn)
        except BaseException:
            await conn.close()
            raise

    def _readable(self) -> None:
        try:
            self.pgconn.consume_input()
        except psycopg.Error as exc:
            self._break(exc)
            return
        waiter = self._waiter
        if waiter is not None and not waiter.done() and not self.pgconn.is_busy():
            waiter.set_result(None)

    def _break(self, exc: BaseException | None = None) -> None:
        if not self.broken:
            self.broken = True
            self._loop.remove_reader(self.fd)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionLost(str(exc) if exc else "connection lost"))

    async def _result(self) -> pq.abc.PGresult | None:
        pgconn = self.pgconn
        while pgconn.is_busy():
            if self.broken:
                raise ConnectionLost("connection lost")
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return pgconn.get_result()

    async def roundtrip(self, statements: Sequence[tuple[str, dict[str, Any]]]
                        ) -> list[list[tuple[Any, ...]]]:
        """Send ``statements`` and a sync at once; the rows of each (``[]`` for commands).

        Raises the first statement's error (the later ones were skipped by the server),
        ConnectionLost if the connection broke.
        """
        if self.broken:
            raise ConnectionLost("connection lost")
        pgconn = self.pgconn
        tx = self.tx
        # Per command sent: None for a statement (its rows are answered), or the cache key
        # and name of a prepare (cached once the server confirmed it, whatever follows).
        sent: list[tuple[tuple[str, tuple[int, ...]], bytes] | None] = []
        preparing: dict[tuple[str, tuple[int, ...]], bytes] = {}
        try:
            for sql, params in statements:
                query, names = _convert(sql)
                if names:
                    values = tx.dump_sequence([params[n] for n in names],
                                              [PyFormat.AUTO] * len(names))
                    types, formats = tuple(tx.types), tx.formats
                else:  # BEGIN, COMMIT: prepared too, so never parsed again
                    values, types, formats = (), (), None
                key = (sql, types)
                name = self.prepared.get(key) or preparing.get(key)
                if name is None:
                    self._names += 1
                    name = preparing[key] = f"tl_start_{self._names}".encode()
                    pgconn.send_prepare(name, query, param_types=types)
                    sent.append((key, name))
                pgconn.send_query_prepared(name, values, param_formats=formats)
                sent.append(None)
            pgconn.pipeline_sync()
            while pgconn.flush():  # only when the socket buffer is full: rare
                await asyncio.sleep(0)
        except psycopg.Error as exc:
            self._break(exc)
            raise ConnectionLost(str(exc)) from exc
        out: list[list[tuple[Any, ...]]] = []
        error: BaseException | None = None
        for prepared in sent:
            result = await self._result()
            while await self._result() is not None:  # each command ends with no result
                pass
            if result is None:
                raise ConnectionLost("pipeline out of step")
            status = result.status
            rows: list[tuple[Any, ...]] = []
            if status == _TUPLES_OK:
                tx.set_pgresult(result)
                rows = tx.load_rows(0, result.ntuples, tuple)
            elif status == _COMMAND_OK and prepared is not None:
                self.prepared[prepared[0]] = prepared[1]
            elif error is None and status == _FATAL_ERROR:
                error = pg_errors.error_from_result(result, encoding=self.encoding)
            if prepared is None:
                out.append(rows)
        sync = await self._result()
        if sync is None or sync.status != _PIPELINE_SYNC:
            self._break()
            raise ConnectionLost("pipeline out of step")
        if error is not None:
            raise error
        return out

    @property
    def idle(self) -> bool:
        """Outside any transaction, ready for the next start."""
        return not self.broken and self.pgconn.transaction_status == _IDLE

    def abandon(self) -> None:
        """Stop using this connection (its state is unknown); ``close`` still applies."""
        self._break()

    async def close(self) -> None:
        self._break()
        await self.conn.close()


def _stale_statements(exc: BaseException) -> bool:
    """The connection's prepared statements no longer fit the schema: a migration changed
    a column they answer (its type or collation: "cached plan must not change result
    type"), or they are gone (a pooler discarded them). Only a new connection helps."""
    return isinstance(exc, pg_errors.InvalidSqlStatementName) or (
        isinstance(exc, pg_errors.FeatureNotSupported)
        and "cached plan must not change result type" in str(exc))


def _retryable(exc: BaseException) -> bool:
    # Every attempt of a start carries its hold key, so retrying one whose commit may
    # have happened (a lost connection) answers the stored outcome instead of holding
    # again.
    return isinstance(exc, psycopg.OperationalError | pg_errors.IntegrityError
                      | pg_errors.SerializationFailure | pg_errors.DeadlockDetected
                      | pg_errors.LockNotAvailable) or _stale_statements(exc)


@dataclass(slots=True, eq=False)
class _Pending:
    """A start waiting for, or being run in, a group."""

    user_id: str
    feature_endpoint_id: str
    max_output_tokens: int | None
    hold: int | None
    model: str | None
    key: str
    digest: str
    future: asyncio.Future[StartResult]
    attempts: int = 0
    alone: bool = False  # its group failed: tried again in a group of its own


class StartPool:
    """A start's connections for one API process, and the catalog it decides with.

    Starts are run in groups: the starts that arrived while the connections were busy
    (or in the same turn of the event loop) go together, up to ``MAX_GROUP`` on distinct
    accounts and keys, through one set of statements and one commit (``pgstart`` takes
    arrays). PostgreSQL spends most of a start's time per statement and per commit, not
    per row, so under load a group of eight costs it little more than one start; with a
    connection free, a start still goes at once, alone. A group that fails as a whole (a
    lost connection, a deadlock, a key raced by another group) is tried again one start
    at a time, so one start's failure is never another's.
    """

    def __init__(self, settings: Settings, size: int) -> None:
        self.settings = settings
        self.size = size
        url = make_url(settings.database_url).set(drivername="postgresql")
        if "application_name" not in url.query:  # tell them apart in pg_stat_activity
            url = url.update_query_dict({"application_name": APPLICATION_NAME})
        self.conninfo = url.render_as_string(hide_password=False)
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
        self._outbox: list[notify.BalanceNotice] = []

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

    def _announce(self, notices: list[notify.BalanceNotice]) -> None:
        """Publish committed notices soon (``NOTIFY_BATCH_SECONDS``), in commit order."""
        if not notices:
            return
        if not self._outbox:
            asyncio.get_running_loop().call_later(NOTIFY_BATCH_SECONDS, self._send_outbox)
        self._outbox.extend(notices)

    def _send_outbox(self) -> None:
        notices, self._outbox = self._outbox, []
        notify.publish_soon(self.settings, notices)

    # -- the catalog ------------------------------------------------------------------

    async def catalog(self) -> Catalog:
        """The stored catalog, re-read (off the loop) at most every REFRESH_SECONDS."""
        cached = self._catalog
        if cached is not None and time.monotonic() - cached[1] < REFRESH_SECONDS:
            return cached[0]
        if self._refresh is None:
            self._refresh = asyncio.ensure_future(asyncio.get_running_loop().run_in_executor(
                None, _load_catalog, self.settings.database_url))
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

    async def start(self, user_id: str, feature_endpoint_id: str, *,
                    max_output_tokens: int | None = None, hold: int | None = None,
                    model: str | None = None, key: str | None = None) -> StartResult:
        """``service.run_start`` on this pool: the same answers, rows and notices.

        Cancelled while still waiting for its group, the start never runs; once in a
        running group, it completes (or not) with the group, unanswered.
        """
        if self._closed:
            raise ConnectionLost("the start pool was closed")
        _checked("max_output_tokens", max_output_tokens)
        _checked("hold", hold)
        digest = _start_digest(user_id, feature_endpoint_id, max_output_tokens, hold, model)
        # One hold key for every attempt: an attempt whose commit is in doubt (the
        # connection broke after the commit was sent) is found by the next one, which
        # answers its stored outcome instead of holding twice.
        pending = _Pending(user_id, feature_endpoint_id, max_output_tokens, hold, model,
                           key or f"hold:{uuid.uuid4().hex}", digest,
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
            if (group and pending.alone) or pending.user_id in users or pending.key in keys:
                passed.append(pending)  # after the group that has its account commits
                continue
            group.append(pending)
            users.add(pending.user_id)
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
                self._busy_users.discard(pending.user_id)
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
                if _stale_statements(exc):
                    log.warning("dropping a start connection whose prepared statements no "
                                "longer fit the schema (%s)", exc)
                    conn.abandon()
                await self._reset(conn)
                self._retry(group, exc)
                return
            self._release(conn)
            notices: list[notify.BalanceNotice] = []
            for pending, answer in answers:
                if isinstance(answer, BaseException):
                    if not pending.future.done():
                        pending.future.set_exception(answer)
                    continue
                result, _, started = answer
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

    async def _connect(self) -> PipeConnection:
        """A new connection for a group (``_dispatch`` counted it in ``_opened``)."""
        try:
            return await PipeConnection.connect(self.conninfo)
        except BaseException:
            self._opened -= 1
            raise

    async def _attempt(self, conn: PipeConnection, group: list[_Pending]
                       ) -> list[tuple[_Pending, pgstart.Started | BaseException]]:
        """One transaction for the group: lock, decide each start, write, commit."""
        START_GROUP_SIZE.observe(len(group))
        catalog = await self.catalog()
        now = utcnow()
        rows = await conn.roundtrip([
            BEGIN, *pgstart.reads([p.user_id for p in group], [p.key for p in group])])
        locked = pgstart.Locked.of(rows[1:])
        answers: list[tuple[_Pending, pgstart.Started | BaseException]] = []
        decided: list[tuple[_Pending, pgstart.Decision]] = []
        for p in group:
            try:
                decided.append((p, pgstart.decide(
                    locked, p.user_id, p.feature_endpoint_id, now=now,
                    hold_ttl_seconds=self.settings.hold_ttl_seconds,
                    max_output_tokens=p.max_output_tokens, hold=p.hold, model=p.model,
                    key=p.key, catalog=catalog, digest=p.digest)))
            except Exception as exc:  # noqa: BLE001 - this start's answer, not the group's
                answers.append((p, exc))
        decisions = [d for _, d in decided]
        statement = pgstart.write(decisions, now)
        if statement is None:
            await conn.roundtrip([COMMIT])
            written: list[tuple[Any, ...]] = []
        else:
            written = (await conn.roundtrip([statement, COMMIT]))[0]
        answers.extend(zip([p for p, _ in decided], pgstart.finish(decisions, written),
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
        if pending.attempts >= ATTEMPTS or not _retryable(exc):
            if not pending.future.done():
                pending.future.set_exception(exc)
            return
        asyncio.get_running_loop().call_later(0.01 * pending.attempts, self._again, pending)

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


def _load_catalog(url: str) -> Catalog:
    with unit_of_work(url) as session:
        return current_catalog(session)
