"""``AsyncLedgerClient``: the SDK for asyncio applications.

Every method is the :class:`~tokenledger.sdk.client.LedgerClient` method of the same name,
run in a worker thread (``asyncio.to_thread``) so the event loop never waits on the
database or the broker; the answers, the exceptions and the guarantees are the sync
client's, because it is the sync client doing the work. A thread per call in flight is
cheap next to a ledger round trip, and it keeps one implementation of every rule.
``token_process`` answers the same object as the sync client's, used with ``async with``
(the streaming form's ``add_output`` is then awaited).

    async with AsyncLedgerClient() as client:
        start = await client.token_process_start("u1", "text_generation")
        async with client.token_process("u1", "text_generation", stream=True) as proc:
            async for chunk in model.astream(prompt):
                await proc.add_output(chunk.tokens)
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from tokenledger.config import Settings
from tokenledger.sdk.client import LedgerClient

if TYPE_CHECKING:
    from tokenledger.messages import AnyEvent
    from tokenledger.renewals.service import Eligibility
    from tokenledger.results import (
        Affordability,
        Balance,
        Entry,
        EventResult,
        ExtendResult,
        RenewalResult,
        ResetResult,
        StartResult,
        Statistics,
    )
    from tokenledger.sdk.process import TokenProcess
    from tokenledger.sdk.stream import StreamingProcess

P = ParamSpec("P")
T = TypeVar("T")


class AsyncLedgerClient:
    """The sync client's methods, awaitable (each runs in a worker thread)."""

    def __init__(self, settings: Settings | None = None, *, linger_ms: float = 0,
                 client: LedgerClient | None = None) -> None:
        self.sync = client or LedgerClient(settings, linger_ms=linger_ms)

    @property
    def settings(self) -> Settings:
        return self.sync.settings

    @staticmethod
    async def _run(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        return await asyncio.to_thread(fn, *args, **kwargs)

    # -- publishing ----------------------------------------------------------------------

    async def publish(self, event: dict[str, Any] | AnyEvent) -> str:
        return await self._run(self.sync.publish, event)

    async def publish_many(self, events: Iterable[dict[str, Any] | AnyEvent]) -> list[str]:
        return await self._run(self.sync.publish_many, list(events))

    async def charge(self, user_id: str, feature: str | None = None, amount: int | None = None,
                     **options: Any) -> str:
        return await self._run(self.sync.charge, user_id, feature, amount, **options)

    async def credit(self, user_id: str, amount: int, wallet_type: str = "PREMIUM",
                     **options: Any) -> str:
        return await self._run(self.sync.credit, user_id, amount, wallet_type, **options)

    async def refund(self, user_id: str, original_key: str, amount: int | None = None,
                     **options: Any) -> str:
        return await self._run(self.sync.refund, user_id, original_key, amount, **options)

    async def open_account(self, user_id: str, plan: str | None = None,
                           timezone: str | None = None, key: str | None = None) -> str:
        return await self._run(self.sync.open_account, user_id, plan, timezone, key)

    # -- token processes -----------------------------------------------------------------

    async def token_process_start(self, user_id: str, feature_endpoint_id: str,
                                  **options: Any) -> StartResult:
        return await self._run(self.sync.token_process_start, user_id, feature_endpoint_id,
                               **options)

    async def extend(self, hold_id: int, by: int | None = None, **options: Any
                     ) -> ExtendResult:
        return await self._run(self.sync.extend, hold_id, by, **options)

    async def token_process_end(self, user_id: str, feature_endpoint_id: str,
                                input_tokens: int, output_tokens: int, **options: Any) -> str:
        return await self._run(self.sync.token_process_end, user_id, feature_endpoint_id,
                               input_tokens, output_tokens, **options)

    def token_process(self, user_id: str | Callable[..., str], feature_endpoint_id: str,
                      **options: Any) -> TokenProcess | StreamingProcess:
        """The sync client's ``token_process``, for ``async with`` (or an async def
        decorated, in the streaming form)."""
        return self.sync.token_process(user_id, feature_endpoint_id, **options)

    # -- reads -------------------------------------------------------------------------

    async def result(self, key: str, timeout: float | None = None) -> EventResult:
        return await self._run(self.sync.result, key, timeout)

    async def balance(self, user_id: str, at: datetime | None = None) -> Balance:
        return await self._run(self.sync.balance, user_id, at)

    async def can_afford(self, user_id: str, feature: str) -> Affordability:
        return await self._run(self.sync.can_afford, user_id, feature)

    async def history(self, user_id: str, type: str | None = None,  # noqa: A002
                      **options: Any) -> list[Entry]:
        return await self._run(self.sync.history, user_id, type, **options)

    async def statistics(self, user_id: str, start: datetime | None = None,
                         end: datetime | None = None) -> Statistics:
        return await self._run(self.sync.statistics, user_id, start, end)

    async def eligibility(self, user_id: str) -> Eligibility:
        return await self._run(self.sync.eligibility, user_id)

    async def renew(self, user_id: str) -> RenewalResult:
        return await self._run(self.sync.renew, user_id)

    async def reset_balance(self, user_id: str, balance: int, reason: str, *,
                            key: str | None = None) -> ResetResult:
        return await self._run(self.sync.reset_balance, user_id, balance, reason, key=key)

    # -- lifetime ------------------------------------------------------------------------

    async def close(self) -> None:
        await self._run(self.sync.close)

    async def __aenter__(self) -> AsyncLedgerClient:
        return self

    async def __aexit__(self, *_: Any) -> None:
        await self.close()
