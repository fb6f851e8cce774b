"""Extend: an open hold grows under the account lock, drawing as a start does; concurrent
extends and starts on one account never hold more than it has."""

from __future__ import annotations

import random
import threading
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import select

from tests.support import apply, assert_verified, balances_by_user, session_scope
from tokenledger import LedgerClient, Settings
from tokenledger.errors import Conflict, NotFound, ValidationFailed
from tokenledger.ledger.models import LedgerEntry
from tokenledger.tokenprocess.models import Hold

pytestmark = pytest.mark.services


def opened(settings: Settings, plan: str = "Gift") -> str:
    user = f"ext-{uuid.uuid4().hex[:10]}"
    apply(settings, {"type": "open_account", "key": f"open:{user}", "user_id": user,
                     "plan": plan})
    return user


def test_extend_by_draws_into_the_same_hold(client: LedgerClient, db: Settings) -> None:
    user = opened(db)
    start = client.token_process_start(user, "text_generation", hold=10)
    grown = client.extend(start.hold_id, 15, key="ext-1")
    assert (grown.status, grown.held, grown.added, grown.available) == ("extended", 25, 15, 75)
    assert grown.expires_at is not None and grown.expires_at >= start.expires_at
    # The same key and arguments: the first answer, nothing drawn twice.
    assert client.extend(start.hold_id, 15, key="ext-1").held == 25
    with pytest.raises(Conflict):
        client.extend(start.hold_id, 16, key="ext-1")
    refused = client.extend(start.hold_id, 76)
    assert (refused.status, refused.held, refused.available) == ("limit_reached", 25, 75)
    with session_scope(db) as s:
        hold = s.get(Hold, start.hold_id)
        assert hold.amount == 25 and sum(a["amount"] for a in hold.allocations) == 25
        held = s.scalars(select(LedgerEntry.amount).where(LedgerEntry.type == "HOLD")).all()
        assert sorted(held) == [-15, -10]
    assert balances_by_user(db)[user] == 75
    assert_verified(db)


def test_extend_to_output_tokens_prices_with_the_hold_model(client: LedgerClient,
                                                            db: Settings) -> None:
    user = opened(db)
    # gemini-pro: 1,000 tokens a credit, output weight 4, +20%: 1,000 output = 4.8 -> 5.
    start = client.token_process_start(user, "text_generation", max_output_tokens=1000)
    assert start.held == 5
    grown = client.extend(start.hold_id, to_output_tokens=5000)
    assert (grown.status, grown.held) == ("extended", 24)
    assert grown.covers_output_tokens == 5000
    # Already covered: nothing drawn.
    same = client.extend(start.hold_id, to_output_tokens=100)
    assert (same.status, same.held, same.added) == ("extended", 24, 0)


def test_extend_refuses_closed_unknown_and_bad_holds(client: LedgerClient, db: Settings,
                                                    worker) -> None:
    user = opened(db)
    start = client.token_process_start(user, "text_generation", hold=3)
    end = client.token_process_end(user, "text_generation", 0, 0, hold_id=start.hold_id)
    client.result(end, timeout=30)
    assert client.extend(start.hold_id, 1).status == "closed"
    with pytest.raises(NotFound):
        client.extend(10**12, 1)
    with pytest.raises(ValidationFailed):
        client.extend(start.hold_id, 1, to_output_tokens=5)
    with pytest.raises(ValidationFailed):
        client.extend(start.hold_id)


def test_concurrent_extends_and_starts_never_overspend(settings: Settings,
                                                       db: Settings) -> None:
    user = opened(db)  # Gift: 100
    errors: list[BaseException] = []
    extended: list[int] = []
    lock = threading.Lock()

    def run(seed: int) -> None:
        rng = random.Random(seed)
        try:
            with LedgerClient(settings) as c:
                for _ in range(6):
                    start = c.token_process_start(user, "text_generation",
                                                  hold=rng.randint(1, 6))
                    if not start.accessible:
                        continue
                    for _ in range(3):
                        grown = c.extend(start.hold_id, rng.randint(1, 9))
                        assert grown.available >= 0
                        if grown.extended:
                            with lock:
                                extended.append(grown.added)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert extended
    with session_scope(db) as s:
        held = sum(s.scalars(select(Hold.amount).where(Hold.user_id == user)))
    balance = balances_by_user(db)[user]
    assert balance >= 0
    assert balance + held == 100  # every credit is either free or held, none twice
    assert_verified(db)


def test_extend_from_the_cli(client: LedgerClient, db: Settings) -> None:
    from tests.support import run_cli

    user = opened(db)
    start = client.token_process_start(user, "text_generation", hold=10)
    done = run_cli(db, "extend", str(start.hold_id), "--by", "5", "--json")
    assert done.exit_code == 0, done.stdout
    assert '"held": 15' in done.stdout
    refused = run_cli(db, "extend", str(start.hold_id), "--by", "500")
    assert refused.exit_code == 11 and "limit_reached" in refused.stdout


def test_holds_past_expiry_stop_counting_for_an_extend(client: LedgerClient,
                                                       db: Settings) -> None:
    from sqlalchemy import update

    user = opened(db)  # 100
    mine = client.token_process_start(user, "text_generation", hold=10)
    stale = client.token_process_start(user, "text_generation", hold=60)
    with session_scope(db) as s:  # its producer died long ago; no sweep ran since
        s.execute(update(Hold).where(Hold.id == stale.hold_id).values(
            expires_at=Hold.created_at - timedelta(seconds=1)))
    grown = client.extend(mine.hold_id, 80)
    assert (grown.status, grown.held, grown.available) == ("extended", 90, 10)
    with session_scope(db) as s:
        assert s.get(Hold, stale.hold_id).status == "expired"
    assert_verified(db)
