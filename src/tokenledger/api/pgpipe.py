"""Token-process starts on PostgreSQL from the API's event loop, in two round trips.

The start's transaction is short and its statements are fixed (``tokenprocess.pgstart``),
so what a start costs is mostly per round trip: a wake-up of the server and of the
client, and in a thread pool a hop to a thread and back. Here each connection runs in
libpq's pipeline mode, driven straight from the event loop (no thread), and a start is:

1. ``BEGIN`` + the reads (account lock, wallets, stored outcome), sent at once;
2. the decision in Python (``pgstart.decide``), under the account lock;
3. the write + ``COMMIT``, sent at once; the answer is sent once the commit is durable.

The server runs pipelined statements one after another, each with its own snapshot, so
the reads see what ``pgstart`` requires. psycopg's own pipeline waits for the socket to be
readable *or writable* and so spins while the server works; here the client sends
everything, flushes, and then only waits until the socket is readable.

Statements are prepared on each connection on first use (with the parameter types
psycopg chose for them) and run with generic plans: the write's plan is the same for
every start, and letting PostgreSQL re-plan it per execution (its default for the first
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


def _retryable(exc: BaseException) -> bool:
    # Every attempt of a start carries its hold key, so retrying one whose commit may
    # have happened (a lost connection) answers the stored outcome instead of holding
    # again.
    return isinstance(exc, psycopg.OperationalError | pg_errors.IntegrityError
                      | pg_errors.SerializationFailure | pg_errors.DeadlockDetected
                      | pg_errors.LockNotAvailable)


class StartPool:
    """A start's connections for one API process, and the catalog it decides with."""

    def __init__(self, settings: Settings, size: int) -> None:
        self.settings = settings
        self.size = size
        url = make_url(settings.database_url).set(drivername="postgresql")
        if "application_name" not in url.query:  # tell them apart in pg_stat_activity
            url = url.update_query_dict({"application_name": APPLICATION_NAME})
        self.conninfo = url.render_as_string(hide_password=False)
        self._idle: list[PipeConnection] = []
        self._opened = 0
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._catalog: tuple[Catalog, float] | None = None
        self._refresh: asyncio.Future[Catalog] | None = None
        self._outbox: list[notify.BalanceNotice] = []

    # -- connections ------------------------------------------------------------------

    async def _acquire(self) -> PipeConnection:
        while True:
            while self._idle:
                conn = self._idle.pop()  # the most recently used: its pages are warm
                if not conn.broken:
                    return conn
                self._opened -= 1
            if self._opened < self.size:
                self._opened += 1
                try:
                    return await PipeConnection.connect(self.conninfo)
                except BaseException:
                    self._opened -= 1
                    self._wake()
                    raise
            freed = asyncio.get_running_loop().create_future()
            self._waiting.append(freed)
            try:
                await freed
            except asyncio.CancelledError:
                if freed.done():
                    self._wake()  # pass the turn on
                raise

    def _wake(self) -> None:
        while self._waiting:
            freed = self._waiting.popleft()
            if not freed.done():
                freed.set_result(None)
                return

    def _release(self, conn: PipeConnection) -> None:
        if conn.idle:
            self._idle.append(conn)
        else:
            self._opened -= 1
            asyncio.get_running_loop().create_task(conn.close())
        self._wake()

    async def _reset(self, conn: PipeConnection) -> None:
        """Roll back whatever a failed start left open, or drop the connection."""
        if not conn.broken and not conn.idle:
            try:
                await conn.roundtrip([ROLLBACK])
            except psycopg.Error:
                log.warning("dropping a start connection that could not roll back")
        self._release(conn)

    async def close(self) -> None:
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
            catalog = await refresh
        finally:
            if self._refresh is refresh:
                self._refresh = None
        self._catalog = (catalog, time.monotonic())
        return catalog

    # -- the start --------------------------------------------------------------------

    async def start(self, user_id: str, feature_endpoint_id: str, *,
                    max_output_tokens: int | None = None, hold: int | None = None,
                    model: str | None = None, key: str | None = None) -> StartResult:
        """``service.run_start`` on this pool: the same answers, rows and notices."""
        _checked("max_output_tokens", max_output_tokens)
        _checked("hold", hold)
        digest = _start_digest(user_id, feature_endpoint_id, max_output_tokens, hold, model)
        catalog = await self.catalog()
        # One hold key for every attempt: an attempt whose commit is in doubt (the
        # connection broke after the commit was sent) is found by the next one, which
        # answers its stored outcome instead of holding twice.
        key = key or f"hold:{uuid.uuid4().hex}"
        attempt = 0
        while True:
            conn = await self._acquire()
            try:
                now = utcnow()
                rows = await conn.roundtrip([BEGIN, *pgstart.reads(user_id, key)])
                decision = pgstart.decide(
                    rows[1:], user_id, feature_endpoint_id, now=now,
                    hold_ttl_seconds=self.settings.hold_ttl_seconds,
                    max_output_tokens=max_output_tokens, hold=hold, model=model, key=key,
                    catalog=catalog, digest=digest)
                if decision.write is None:
                    await conn.roundtrip([COMMIT])
                    result, notices = decision.result, []
                else:
                    written = await conn.roundtrip([decision.write, COMMIT])
                    result, _, notices = pgstart.finish(decision, written[0][0])
            except asyncio.CancelledError:
                conn.abandon()  # in an unknown state: never reused
                self._release(conn)
                raise
            except Exception as exc:
                await self._reset(conn)
                attempt += 1
                if attempt >= ATTEMPTS or not _retryable(exc):
                    raise
                await asyncio.sleep(0.01 * attempt)
                continue
            self._release(conn)
            self._announce(notices)
            return result


def _load_catalog(url: str) -> Catalog:
    with unit_of_work(url) as session:
        return current_catalog(session)
