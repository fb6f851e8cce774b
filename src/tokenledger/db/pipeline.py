"""One PostgreSQL connection in libpq's pipeline mode, driven from an asyncio event loop.

What a short transaction costs is mostly per round trip and per statement: a wake-up of
the server and of the client, the executor's start-up, a commit. A ``PipeConnection``
sends a whole transaction's statements (``BEGIN``, reads; then the write and ``COMMIT``)
at once and waits for all their results, with no thread in between. psycopg's own
pipeline waits for the socket to be readable *or writable* and so spins while the server
works; here the client sends everything, flushes, and then only waits until the socket is
readable.

Statements are prepared on each connection on first use (with the parameter types
psycopg chose for them) and run with generic plans: letting PostgreSQL re-plan a fixed
statement per execution cost more than executing it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg import pq
from psycopg.adapt import PyFormat, Transformer

from tokenledger.db.sql import numbered

BEGIN = ("BEGIN", {})
COMMIT = ("COMMIT", {})
ROLLBACK = ("ROLLBACK", {})

_TUPLES_OK = pq.ExecStatus.TUPLES_OK
_COMMAND_OK = pq.ExecStatus.COMMAND_OK
_FATAL_ERROR = pq.ExecStatus.FATAL_ERROR
_PIPELINE_SYNC = pq.ExecStatus.PIPELINE_SYNC
_IDLE = pq.TransactionStatus.IDLE


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
                query, names = numbered(sql)
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
                    name = preparing[key] = f"tl_{self._names}".encode()
                    pgconn.send_prepare(name, query.encode(), param_types=types)
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
