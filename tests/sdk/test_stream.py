"""The streaming token process: a hold that grows ahead of the stream, a stop at the
balance, exactly one settlement however the block is left (sync and async)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import func, select

from tests.api.support import api_server
from tests.support import ROOT, Worker, apply, assert_verified, balances_by_user, session_scope
from tokenledger import AsyncLedgerClient, BalanceReached, LedgerClient, Settings
from tokenledger.apikeys.service import create_key
from tokenledger.catalog.pricing import price_usage
from tokenledger.catalog.service import current_catalog
from tokenledger.db.uow import unit_of_work
from tokenledger.ledger.models import EventOutcome, LedgerEntry
from tokenledger.sdk.http import HttpLedgerClient
from tokenledger.tokenprocess.models import Hold
from tokenledger.tokenprocess.service import release_expired_holds

__all__ = ["api_server"]  # fixtures used by name
pytestmark = pytest.mark.services
CHUNK = 100
STREAM_TOKENS = 16_666  # gemini-pro: 16,666 × 4 / 1,000 × 1.2 = 79.997 → 80 credits


def fake_model(total: int = STREAM_TOKENS) -> Iterator[int]:
    """A model's stream: the output-token count of each chunk."""
    while total > 0:
        yield min(CHUNK, total)
        total -= CHUNK


def with_balance(settings: Settings, balance: int) -> str:
    user = f"st-{uuid.uuid4().hex[:10]}"
    apply(settings, {"type": "open_account", "key": f"open:{user}", "user_id": user,
                     "plan": "Gift"})
    if balance < 100:
        apply(settings, {"type": "charge", "key": f"spend:{user}", "user_id": user,
                         "amount": 100 - balance})
    return user


def settlements(settings: Settings, hold_id: int) -> tuple[str, int]:
    """(the hold's status, how many end outcomes name it)."""
    with session_scope(settings) as s:
        status = s.get(Hold, hold_id).status
        ends = s.scalar(select(func.count()).select_from(EventOutcome).where(
            EventOutcome.event_type == "token_process_end",
            EventOutcome.result["hold_id"].as_integer() == hold_id))
    return status, ends


def test_the_catalog_prices_the_fake_stream_at_80(db: Settings) -> None:
    with session_scope(db) as s:
        catalog = current_catalog(s)
    feature = catalog.features["text_generation"]
    assert price_usage(catalog, feature, 0, STREAM_TOKENS).cost == 80


@pytest.mark.parametrize("mode", ["sync", "async", "http"])
def test_a_stream_costing_80_stops_at_a_balance_of_50(worker, settings: Settings,
                                                      db: Settings, mode: str,
                                                      request: pytest.FixtureRequest) -> None:
    """Through the sync client, the async one (``async with``) and the HTTP client."""
    user = with_balance(db, 50)
    sent: list[int] = []
    if mode == "async":
        async def run():
            async with AsyncLedgerClient(settings) as client, \
                    client.token_process(user, "text_generation", stream=True,
                                         step=2000) as proc:
                for n in fake_model():
                    await proc.add_output(n)
                    sent.append(n)
            return proc, await proc.outcome()

        proc, outcome = asyncio.run(run())
    else:
        with client_for(mode, settings, db, request) as client:
            with client.token_process(user, "text_generation", stream=True,
                                      step=2000) as proc:
                for n in fake_model():
                    proc.add_output(n)
                    sent.append(n)
            outcome = proc.outcome()
    assert sum(sent) < STREAM_TOKENS  # stopped before the end of the stream
    assert proc.should_stop and proc.output_tokens == sum(sent)
    assert (outcome.status, outcome.data["cost"], outcome.data["token"]) == ("applied", 50, 0)
    assert outcome.data["status"] == "returnable"
    assert balances_by_user(db)[user] == 0
    assert settlements(db, proc.hold_id) == ("settled", 1)
    assert_verified(db)


def client_for(mode: str, settings: Settings, db: Settings,
               request: pytest.FixtureRequest) -> Any:
    if mode == "sync":
        return LedgerClient(settings)
    server = request.getfixturevalue("api_server")
    with session_scope(db) as session:
        key = create_key(session, "producer", "stream test").key
    return HttpLedgerClient(server.url, key)


def test_the_flag_form_tells_the_caller_to_stop(worker, client: LedgerClient,
                                                db: Settings) -> None:
    user = with_balance(db, 50)
    with client.token_process(user, "text_generation", stream=True,
                              raise_on_limit=False) as proc:
        for n in fake_model():
            if not proc.add_output(n):
                break
    assert proc.should_stop
    assert proc.outcome().data["cost"] == 50
    assert_verified(db)


def test_a_cancelled_task_settles_once_with_what_was_streamed(worker, client: LedgerClient,
                                                              db: Settings) -> None:
    user = with_balance(db, 100)
    half = asyncio.Event()
    holder: dict = {}

    async def stream() -> None:
        async with client.token_process(user, "text_generation", stream=True) as proc:
            holder["proc"] = proc
            for i, n in enumerate(fake_model()):
                await proc.add_output(n)
                if i == 80:
                    half.set()
                await asyncio.sleep(0.001)

    async def main() -> None:
        task = asyncio.create_task(stream())
        await half.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    proc = holder["proc"]
    assert proc.output_tokens == 81 * CHUNK
    outcome = client.result(proc.end_key, timeout=30)
    assert outcome.data["cost"] == 39  # 8,100 × 4 / 1,000 × 1.2 = 38.88
    assert settlements(db, proc.hold_id) == ("settled", 1)
    assert proc.sync.settle() is None  # settling again does nothing
    assert balances_by_user(db)[user] == 61
    assert_verified(db)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_an_exception_settles_once_and_propagates(worker, client: LedgerClient,
                                                  db: Settings, error) -> None:
    user = with_balance(db, 100)
    with pytest.raises(error), \
            client.token_process(user, "text_generation", stream=True) as proc:
        for i, n in enumerate(fake_model()):
            proc.add_output(n)
            if i == 9:
                raise error("the client went away")
    outcome = proc.outcome()
    assert outcome.data["cost"] == 5  # 1,000 output tokens: 4.8 → 5
    assert settlements(db, proc.hold_id) == ("settled", 1)
    assert_verified(db)


def test_the_decorator_form(worker, client: LedgerClient, db: Settings) -> None:
    user = with_balance(db, 50)

    @client.token_process(lambda prompt, user: user, "text_generation", stream=True)
    def answer(prompt: str, user: str, token_stream) -> int:
        for n in fake_model():
            token_stream.add_output(n)
        return token_stream.output_tokens

    assert answer("hi", user) is None  # stopped at the balance
    assert balances_by_user(db)[user] in (0, 50)  # settled (the end may still be in flight)


def test_balance_reached_is_a_ledger_error() -> None:
    from tokenledger.errors import TokenLedgerError

    assert issubclass(BalanceReached, TokenLedgerError)


PRODUCER = """
import sys, time
from tokenledger import LedgerClient
with LedgerClient() as client:
    proc = client.token_process(sys.argv[1], "text_generation", stream=True, step=500)
    stream = proc.__enter__()
    for _ in range(10):
        stream.add_output(100)
    print(stream.hold_id, stream.held, flush=True)
    time.sleep(600)
"""


def test_a_producer_killed_mid_stream_leaves_a_hold_the_sweep_releases(
        settings: Settings, db: Settings, tmp_path) -> None:
    user = with_balance(db, 100)
    env = {**os.environ, **Worker.env_for(settings), "TOKENLEDGER_HOLD_TTL_SECONDS": "2"}
    proc = subprocess.Popen([sys.executable, "-c", PRODUCER, user], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        line = proc.stdout.readline()
        hold_id, held = map(int, line.split())
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        proc.stdout.close()
    assert held > 0 and balances_by_user(db)[user] == 100 - held
    with session_scope(db) as s:
        expires_at = s.get(Hold, hold_id).expires_at
    time.sleep(2.2)
    with unit_of_work(settings) as uow:
        assert uow.now >= expires_at
        report = release_expired_holds(uow, account_ids=None)
    assert report.holds >= 1
    assert settlements(db, hold_id) == ("expired", 0)
    assert balances_by_user(db)[user] == 100
    with session_scope(db) as s:
        assert s.scalar(select(func.count()).select_from(LedgerEntry).where(
            LedgerEntry.type == "HOLD_RELEASE")) >= 1
    assert_verified(db)


def test_a_disconnected_client_settles_once(worker, client: LedgerClient, db: Settings) -> None:
    """A web framework closes a streaming response's generator when its client goes away
    (``aclose``: GeneratorExit inside the ``async with``); the process settles once."""
    user = with_balance(db, 100)
    holder: dict = {}

    async def response_body():
        async with client.token_process(user, "text_generation", stream=True) as proc:
            holder["proc"] = proc
            for n in fake_model():
                await proc.add_output(n)
                yield b"chunk"

    async def main() -> None:
        body = response_body()
        for _ in range(30):
            await body.__anext__()
        await body.aclose()  # the client disconnected

    asyncio.run(main())
    proc = holder["proc"]
    outcome = client.result(proc.end_key, timeout=30)
    assert outcome.data["cost"] == 15  # 3,000 output tokens: 14.4 -> 15
    assert settlements(db, proc.hold_id) == ("settled", 1)
    assert_verified(db)
