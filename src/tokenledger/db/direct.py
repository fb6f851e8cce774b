"""Quick reads without the ORM: one psycopg connection per database per process.

The SDK's and the CLI's short questions (a balance, what happened to a key) run the same
``.sql`` files the API runs through its sessions, over a plain autocommit connection, so
a process that only asks them never loads SQLAlchemy.
"""

from __future__ import annotations

import atexit
import os
import threading
from typing import TYPE_CHECKING, Any

from tokenledger.db.sql import load, pyformat

if TYPE_CHECKING:
    import psycopg

    from tokenledger.config import Settings

_connections: dict[str, tuple[int, psycopg.Connection[Any]]] = {}
_lock = threading.Lock()


def _connect(url: str) -> psycopg.Connection[Any]:
    import psycopg

    with _lock:
        held = _connections.get(url)
        if held is not None and held[0] == os.getpid() and not held[1].closed:
            return held[1]
        # SQLAlchemy's driver prefix off: the rest is a libpq URL.
        conn = psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://", 1),
                               autocommit=True, connect_timeout=10)
        if not _connections:
            atexit.register(close_all)
        _connections[url] = (os.getpid(), conn)  # a forked child makes its own
        return conn


def fetch(settings: Settings, package: str, name: str, params: dict[str, Any]
          ) -> list[tuple[Any, ...]]:
    """The rows of ``<package>/sql/<name>.sql`` for ``params``. A connection the server
    closed is replaced once."""
    import psycopg

    sql = pyformat(load(package, name))
    url = settings.ledger_url()
    for attempt in (1, 2):
        conn = _connect(url)
        try:
            return conn.execute(sql, params).fetchall()
        except psycopg.OperationalError:
            if attempt == 2 or not conn.closed:
                raise
    raise AssertionError("unreachable")


def close_all() -> None:
    """Close this process's quick-read connections."""
    with _lock:
        for pid, conn in _connections.values():
            if pid == os.getpid():
                conn.close()
        _connections.clear()
