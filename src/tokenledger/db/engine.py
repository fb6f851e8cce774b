"""Engines and sessions: one engine and one sessionmaker per database URL per process."""

from __future__ import annotations

import threading
from typing import Any

from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session, sessionmaker

_engines: dict[str, Engine] = {}
_factories: dict[str, sessionmaker[Session]] = {}
_lock = threading.Lock()
# Pool options for engines created from now on. A pool smaller than the process's
# concurrency closes every overflow connection it gets back, so each burst then pays for
# new server processes: a server sizes it to its thread count (see configure_pool).
_pool_options: dict[str, Any] = {"pool_size": 5, "max_overflow": 10, "pool_pre_ping": True}


def configure_pool(*, pool_size: int | None = None, max_overflow: int | None = None,
                   pre_ping: bool | None = None) -> None:
    """Set the pool of engines this process creates from now on (a server calls it at
    start, before its first unit of work)."""
    with _lock:
        if pool_size is not None:
            _pool_options["pool_size"] = pool_size
        if max_overflow is not None:
            _pool_options["max_overflow"] = max_overflow
        if pre_ping is not None:
            _pool_options["pool_pre_ping"] = pre_ping


def get_engine(url: str) -> Engine:
    """One engine per URL per process (pools are per process: never share across fork)."""
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            engine = create_engine(url, pool_recycle=1800, **_pool_options)
            _engines[url] = engine
        return engine


def session_factory(url: str) -> sessionmaker[Session]:
    """One sessionmaker per URL per process: making one defines a Session subclass, whose
    event dispatch SQLAlchemy then builds, which costs more than a short transaction."""
    factory = _factories.get(url)
    if factory is None or factory.kw["bind"] is not get_engine(url):
        factory = sessionmaker(bind=get_engine(url), expire_on_commit=False)
        _factories[url] = factory
    return factory


def dispose_engines(close: bool = False) -> None:
    """Drop pooled connections. A forked child passes ``close=False``: the sockets belong
    to the parent, and closing them from the child would break the parent's sessions."""
    with _lock:
        for engine in _engines.values():
            engine.dispose(close=close)
        _engines.clear()


def libpq_url(url: str) -> str:
    """A SQLAlchemy URL as psycopg and libpq take it (``postgresql://``)."""
    from sqlalchemy.engine import make_url

    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
