"""The SDK's clients behind one face, so a scenario runs against each of them: the sync
``LedgerClient``, the ``AsyncLedgerClient`` (its coroutines run to completion on a loop of
the test's own) and the typed HTTP clients, sync and async, against the API."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Iterator
from typing import Any

import pytest

from tests.api.support import api_server
from tests.support import session_scope
from tokenledger import AsyncLedgerClient, LedgerClient, Settings
from tokenledger.apikeys.service import create_key

__all__ = ["api_server"]  # fixtures used by name


class Blocking:
    """An async client's methods called like the sync client's."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.loop = asyncio.new_event_loop()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.client, name)
        if not inspect.iscoroutinefunction(attr):
            return attr
        return lambda *args, **kwargs: self.loop.run_until_complete(attr(*args, **kwargs))

    def close(self) -> None:
        self.loop.run_until_complete(self.client.close())
        self.loop.close()


@pytest.fixture(params=["sync", "async", "http", "http-async"])
def ledger(request: pytest.FixtureRequest, settings: Settings, db: Settings) -> Iterator[Any]:
    """The same scenario through the sync and the async client, and through the typed
    HTTP clients against the API (an admin key: every route)."""
    if request.param == "sync":
        with LedgerClient(settings) as client:
            yield client
        return
    if request.param == "async":
        blocking = Blocking(AsyncLedgerClient(settings))
    else:
        from tokenledger.sdk.http import AsyncHttpLedgerClient, HttpLedgerClient

        server = request.getfixturevalue("api_server")
        with session_scope(db) as session:
            key = create_key(session, "admin", "sdk tests").key
        if request.param == "http":
            with HttpLedgerClient(server.url, key) as client:
                yield client
            return
        blocking = Blocking(AsyncHttpLedgerClient(server.url, key))
    yield blocking
    blocking.close()
