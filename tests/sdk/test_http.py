"""The typed HTTP clients raise the SDK's exception tree."""

from __future__ import annotations

import asyncio

import pytest

from tests.api.support import api_server, keys
from tokenledger import Settings
from tokenledger.errors import (
    AccessDenied,
    AccountNotFound,
    NotFound,
    ServiceUnavailable,
    TokenLedgerError,
    ValidationFailed,
)
from tokenledger.sdk.http import AsyncHttpLedgerClient, HttpLedgerClient

__all__ = ["api_server", "keys"]  # fixtures used by name
pytestmark = pytest.mark.services


def test_statuses_become_the_sdk_errors(api_server, keys: dict[str, str],
                                        db: Settings) -> None:
    with HttpLedgerClient(api_server.url, "not-a-key") as stranger, \
            pytest.raises(AccessDenied):
        stranger.balance("u1")
    with HttpLedgerClient(api_server.url, keys["reader"]) as reader:
        with pytest.raises(AccessDenied):  # a reader may not reset balances
            reader.reset_balance("u1", 5, "no")
        with pytest.raises(AccountNotFound):
            reader.balance("nobody")
        with pytest.raises(AccessDenied):  # nor extend holds
            reader.extend(123456789, 1)
    with HttpLedgerClient(api_server.url, keys["admin"]) as admin:
        with pytest.raises(ValidationFailed):
            admin.charge("u1", amount=-1)  # refused locally, before any request
        with pytest.raises(ValidationFailed, match="by"):
            admin.extend(1)
        with pytest.raises(NotFound):
            admin.extend(123456789, 1)
    with HttpLedgerClient("http://127.0.0.1:9", keys["admin"], timeout=2) as nowhere, \
            pytest.raises(ServiceUnavailable):
        nowhere.balance("u1")
    assert issubclass(AccessDenied, TokenLedgerError)


def test_the_async_client_raises_the_same(api_server, keys: dict[str, str],
                                          db: Settings) -> None:
    async def main() -> None:
        async with AsyncHttpLedgerClient(api_server.url, keys["reader"]) as reader:
            with pytest.raises(AccountNotFound):
                await reader.can_afford("nobody", "chat")
        async with AsyncHttpLedgerClient(api_server.url, "nope") as stranger:
            with pytest.raises(AccessDenied):
                await stranger.balance("u1")

    asyncio.run(main())
