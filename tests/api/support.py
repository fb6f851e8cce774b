"""A real uvicorn server running the API in a thread, over the test database and broker."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn

from tests.support import session_scope
from tokenledger import Settings
from tokenledger.api import create_app
from tokenledger.apikeys.service import create_key

KEY_CACHE_SECONDS = 1.0


class ServerThread:
    """uvicorn on 127.0.0.1 and a free port, in a daemon thread."""

    def __init__(self, settings: Settings, end_wait: float = 20.0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        app = create_app(settings, key_cache_seconds=KEY_CACHE_SECONDS,
                         end_wait_seconds=end_wait)
        config = uvicorn.Config(app, log_level="warning", lifespan="on", loop="asyncio",
                                http="h11", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True, name="api-server")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("API server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


@pytest.fixture(scope="session")
def api_server(settings: Settings) -> Iterator[ServerThread]:
    server = ServerThread(settings).start()
    yield server
    server.stop()


@pytest.fixture
def keys(db: str) -> dict[str, str]:
    """One fresh key per scope (the ``db`` fixture empties api_keys before each test)."""
    out = {}
    with session_scope(db) as session:
        for scope in ("producer", "reader", "admin"):
            out[scope] = create_key(session, scope, f"test {scope}").key
    return out


@pytest.fixture
def http(api_server: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api_server.url, timeout=60) as c:
        yield c


def auth(key: str, **headers: str) -> dict[str, str]:
    return {"x-server-api-key": key, **headers}
