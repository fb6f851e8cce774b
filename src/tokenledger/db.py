"""Engines, sessions and the unit of work: the one place a transaction begins and ends."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from tokenledger.errors import RetryableConflict

_engines: dict[str, Engine] = {}
_lock = threading.Lock()
# Pool options for engines created from now on. A pool smaller than the process's
# concurrency closes every overflow connection it gets back, so each burst then pays for
# new server processes: a server sizes it to its thread count (see configure_pool).
_pool_options: dict[str, Any] = {"pool_size": 5, "max_overflow": 10, "pool_pre_ping": True}


def configure_pool(*, pool_size: int | None = None, max_overflow: int | None = None,
                   pre_ping: bool | None = None) -> None:
    """Set the pool of PostgreSQL engines this process creates from now on (a server calls
    it at start, before its first unit of work)."""
    with _lock:
        if pool_size is not None:
            _pool_options["pool_size"] = pool_size
        if max_overflow is not None:
            _pool_options["max_overflow"] = max_overflow
        if pre_ping is not None:
            _pool_options["pool_pre_ping"] = pre_ping


def _configure_sqlite(engine: Engine) -> None:
    # pysqlite's own transaction handling defers BEGIN and never takes the write lock up
    # front, so two writers can both read a balance and one then fails to upgrade. We
    # take the write lock at BEGIN (IMMEDIATE): SQLite writers queue instead of racing.
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def get_engine(url: str) -> Engine:
    """One engine per URL per process (pools are per process: never share across fork)."""
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            if url.startswith("sqlite"):
                engine = create_engine(url, connect_args={"timeout": 30})
                _configure_sqlite(engine)
            else:
                engine = create_engine(url, pool_recycle=1800, **_pool_options)
            _engines[url] = engine
        return engine


def dispose_engines(close: bool = False) -> None:
    """Drop pooled connections. A forked child passes ``close=False``: the sockets belong
    to the parent, and closing them from the child would break the parent's sessions."""
    with _lock:
        for engine in _engines.values():
            engine.dispose(close=close)
        _engines.clear()


_factories: dict[str, sessionmaker[Session]] = {}


def session_factory(url: str) -> sessionmaker[Session]:
    """One sessionmaker per URL per process: making one defines a Session subclass, whose
    event dispatch SQLAlchemy then builds, which cost more than a short transaction."""
    factory = _factories.get(url)
    if factory is None or factory.kw["bind"] is not get_engine(url):
        factory = sessionmaker(bind=get_engine(url), expire_on_commit=False)
        _factories[url] = factory
    return factory


@contextmanager
def unit_of_work(url: str) -> Iterator[Session]:
    """One transaction: commits when the block ends, rolls back if it raises."""
    with session_factory(url).begin() as session:
        yield session


def insert_for(session: Session) -> Callable[..., Any]:
    """The dialect's INSERT, which has ``on_conflict_do_nothing/do_update``."""
    return postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert


_TRANSIENT_SQLSTATES = {
    "40001",  # serialization_failure
    "40P01",  # deadlock_detected
    "55P03",  # lock_not_available
    "57P01", "57P02", "57P03",  # admin/crash shutdown, cannot connect now
    "53300",  # too_many_connections
    "08000", "08001", "08003", "08004", "08006",  # connection exceptions
}


def is_disconnect(exc: BaseException) -> bool:
    """True when the database could not be reached at all: wait it out, never give up."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, OperationalError):
        sqlstate = getattr(exc.orig, "sqlstate", None)
        return sqlstate is None or sqlstate.startswith("08") or sqlstate.startswith("57P")
    return False


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying the whole unit of work for.

    A unique violation counts: two workers racing to apply the same new key (or create
    the same wallet) collide on a constraint, and the retry then sees the winner's row.
    """

    if isinstance(exc, IntegrityError | RetryableConflict):
        return True
    if isinstance(exc, OperationalError):
        return True
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return True
        sqlstate = getattr(exc.orig, "sqlstate", None)
        return sqlstate in _TRANSIENT_SQLSTATES
    return False
