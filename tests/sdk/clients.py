"""The SDK's clients behind one face, so a scenario runs against each of them: the sync
``LedgerClient``, the ``AsyncLedgerClient`` (its coroutines run to completion on a loop of
the test's own) and, where the test asks for it, the typed HTTP clients."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Iterator
from typing import Any

import pytest

from tokenledger import AsyncLedgerClient, LedgerClient, Settings


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


@pytest.fixture(params=["sync", "async"])
def ledger(request: pytest.FixtureRequest, settings: Settings, db: Settings) -> Iterator[Any]:
    """The same scenario through the sync and the async client."""
    if request.param == "sync":
        with LedgerClient(settings) as client:
            yield client
        return
    blocking = Blocking(AsyncLedgerClient(settings))
    yield blocking
    blocking.close()
