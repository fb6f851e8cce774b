"""The same token-process scenarios through the sync and the async client."""

from __future__ import annotations

import asyncio

import pytest

from tests.sdk.clients import api_server, ledger
from tests.support import assert_verified
from tokenledger import AsyncLedgerClient, Settings
from tokenledger.errors import AccountNotFound, FeatureNotAccessible

__all__ = ["api_server", "ledger"]  # fixtures used by name
pytestmark = pytest.mark.services


def test_start_extend_end_result_balance(worker, ledger, db: Settings) -> None:
    ledger.open_account("c1", plan="Gift")
    start = ledger.token_process_start("c1", "text_generation", hold=10)
    assert (start.status, start.held, start.token) == ("accessible", 10, 90)
    grown = ledger.extend(start.hold_id, 30)
    assert (grown.status, grown.held, grown.available) == ("extended", 40, 60)
    assert ledger.extend(start.hold_id, 61).status == "limit_reached"
    key = ledger.token_process_end("c1", "text_generation", 100, 400, hold_id=start.hold_id)
    outcome = ledger.result(key, timeout=30)
    assert (outcome.data["cost"], outcome.data["token"]) == (3, 97)
    assert ledger.balance("c1").balance == 97
    assert ledger.can_afford("c1", "image_generation").can_afford
    assert [e.type for e in ledger.history("c1", "CHARGE")] == ["CHARGE"]
    assert ledger.statistics("c1").total_spent == 3
    assert ledger.eligibility("c1").eligible is False
    assert ledger.reset_balance("c1", 10, "test").new_balance == 10
    with pytest.raises(AccountNotFound):
        ledger.balance("nobody")
    with pytest.raises(AccountNotFound):
        ledger.token_process_start("nobody", "text_generation")
    assert_verified(db)


def test_async_token_process_block(worker, settings: Settings, db: Settings) -> None:
    async def main() -> None:
        async with AsyncLedgerClient(settings) as client:
            await client.open_account("c2", plan="Gift")
            async with client.token_process("c2", "text_generation", hold=10) as usage:
                usage.report(input_tokens=100, output_tokens=400)
            assert (await client.result(usage.end_key, timeout=30)).data["cost"] == 3
            with pytest.raises(FeatureNotAccessible):
                async with client.token_process("c2", "text_generation", hold=1000):
                    pass

    asyncio.run(main())
    assert_verified(db)
