"""The SDK's start (``LedgerClient.token_process_start``): one unit of work running the
service's statements, notices published after the commit, low-balance crossings kept in
the same transaction, a connection found dead before the commit retried, and a commit
whose answer was lost retried without holding twice."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import select, text

from tests.support import apply, assert_verified, session_scope
from tokenledger import LedgerClient, Settings, StartResult
from tokenledger.db.engine import configure_pool, get_engine
from tokenledger.ledger.models import Account, EventOutcome, LedgerEntry, Wallet
from tokenledger.notify import publisher
from tokenledger.notify import service as notify
from tokenledger.notify.models import LowBalanceState
from tokenledger.tokenprocess.models import Hold

pytestmark = pytest.mark.services


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def run_start(settings: Settings, user: str, feature: str, **kw) -> StartResult:
    with LedgerClient(settings) as client:
        return client.token_process_start(user, feature, **kw)


@pytest.fixture
def collected():
    """Every notice this process publishes while the test runs."""
    items: list[notify.BalanceNotice] = []
    unsubscribe = notify.subscribe(items.append)
    yield items
    publisher.flush_published(10)
    unsubscribe()


def test_start_writes_the_hold_its_entries_wallets_and_outcome(settings: Settings, db: Settings,
                                                                collected) -> None:
    user = uid("rows")
    apply(db, {"type": "open_account", "key": f"open:{user}", "user_id": user,
               "plan": "Professional"})
    apply(db, {"type": "credit", "key": f"top:{user}", "user_id": user, "amount": 7,
               "wallet_type": "PREMIUM"})
    # 2,000 STANDARD + 7 PREMIUM; a hold of 2,003 takes both wallets.
    result = run_start(settings, user, "text_generation", hold=2003, key=f"k:{user}")
    assert (result.status, result.token, result.held) == ("accessible", 4, 2003)
    with session_scope(db) as s:
        row = s.get(Hold, result.hold_id)
        assert (row.key, row.amount, row.status) == (f"k:{user}", 2003, "open")
        parts = {a["wallet_id"]: a["amount"] for a in row.allocations}
        assert len(parts) == 2 and sum(parts.values()) == 2003
        held = s.execute(select(LedgerEntry.wallet_id, LedgerEntry.amount,
                                LedgerEntry.metadata_)
                         .where(LedgerEntry.event_key == f"k:{user}",
                                LedgerEntry.type == "HOLD")).all()
        assert {r.wallet_id: -r.amount for r in held} == parts
        assert all(r.metadata_["hold_id"] == result.hold_id for r in held)
        balances = dict(s.execute(select(Wallet.wallet_type, Wallet.balance).join(
            Account, Account.id == Wallet.account_id).where(Account.user_id == user)).all())
        assert set(balances) == {"STANDARD", "PREMIUM"} and sum(balances.values()) == 4
        outcome = s.get(EventOutcome, f"k:{user}")
        assert (outcome.event_type, outcome.outcome) == ("token_process_start", "applied")
        assert outcome.result["hold_id"] == result.hold_id
    # Same key, same arguments: the stored answer; nothing written twice.
    again = run_start(settings, user, "text_generation", hold=2003, key=f"k:{user}")
    assert (again.hold_id, again.held) == (result.hold_id, 2003)
    assert_verified(db)
    publisher.flush_published(10)
    mine = [(n.event, n.balance) for n in collected if n.user_id == user]
    assert ("balance_changed", 4) in mine
    assert ("balance_low", 4) in mine  # Professional: threshold 100


def test_low_balance_is_published_once_per_crossing_and_rearmed(settings: Settings, db: Settings,
                                                                 collected) -> None:
    user = uid("low")  # Free: 5 credits, threshold 1
    apply(db, {"type": "open_account", "key": f"open:{user}", "user_id": user})
    balances = [run_start(settings, user, "text_generation", hold=h).token for h in (2, 2, 1)]
    assert balances == [3, 1, 0]
    apply(db, {"type": "credit", "key": f"c:{user}", "user_id": user, "amount": 9,
               "wallet_type": "STANDARD"})
    assert run_start(settings, user, "text_generation", hold=1).token == 8  # re-arms
    with session_scope(db) as s:
        assert s.get(LowBalanceState, user) is None
    assert run_start(settings, user, "text_generation", hold=7).token == 1  # crosses again
    publisher.flush_published(10)
    mine = [n for n in collected if n.user_id == user]
    assert [(n.balance, n.threshold) for n in mine if n.event == "balance_low"] == [
        (1, 1), (1, 1)]
    changed = [n.balance for n in mine if n.event == "balance_changed"]
    assert changed == [5, 3, 1, 0, 9, 8, 1]  # the opening and the credit notify too
    seqs = [n.ledger_seq for n in mine if n.event == "balance_changed"]
    assert seqs == sorted(seqs)
    with session_scope(db) as s:
        state = s.get(LowBalanceState, user)
        assert (state.balance, state.threshold, state.ledger_seq) == (1, 1, seqs[-1])


def test_refused_starts_write_nothing_and_publish_nothing(settings: Settings, db: Settings,
                                                          collected) -> None:
    user = uid("refused")
    apply(db, {"type": "open_account", "key": f"open:{user}", "user_id": user})
    poor = run_start(settings, user, "text_generation", hold=6)
    outside = run_start(settings, user, "image_generation")
    assert (poor.status, poor.message, poor.required) == (
        "not-accessible", "Insufficient tokens", 6)
    assert (outside.status, outside.message) == (
        "not-accessible", "Feature endpoint is not available in your package")
    with session_scope(db) as s:
        assert s.scalar(select(Hold.id).where(Hold.user_id == user)) is None
    publisher.flush_published(10)
    assert not [n for n in collected if n.user_id == user and n.event == "balance_low"]


def test_a_connection_found_dead_before_the_commit_is_retried(settings: Settings,
                                                              db: Settings) -> None:
    user = uid("dead")
    apply(db, {"type": "open_account", "key": f"open:{user}", "user_id": user})
    # Its own engine (another URL spelling), without the ping before checkout, as the
    # API server runs it.
    base = db.ledger_url()
    url = base + ("&" if "?" in base else "?") + "application_name=tl-start-nopping"
    configure_pool(pre_ping=False)
    try:
        own = settings.model_copy(update={"database_url": url})
        assert run_start(own, user, "text_generation", hold=1).status == "accessible"
        assert get_engine(url).pool.checkedin() >= 1
        with session_scope(db) as s:
            killed = s.scalar(text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE application_name = 'tl-start-nopping'"))
        assert killed >= 1
        result = run_start(own, user, "text_generation", hold=1)
        assert (result.status, result.token) == ("accessible", 3)
    finally:
        configure_pool(pre_ping=True)
        get_engine(url).dispose()
    with session_scope(db) as s:
        assert s.scalar(select(Hold.id).where(Hold.user_id == user)
                        .order_by(Hold.id.desc()).limit(1)) == result.hold_id
    assert_verified(db)


def test_a_start_whose_commit_answer_was_lost_is_retried_without_holding_twice(
        settings: Settings, db: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """The unit of work commits, then the connection is reported lost (the answer of the
    commit never came): the keyless start is tried again, finds the outcome stored under
    the hold key it made up, and answers it: one hold, one debit."""
    from contextlib import contextmanager

    import psycopg
    from sqlalchemy.exc import OperationalError

    from tokenledger.db import uow as units

    user = uid("lost")
    apply(db, {"type": "open_account", "key": f"open:{user}", "user_id": user})
    real = units.unit_of_work
    lost: list[int] = []

    @contextmanager
    def answer_lost_once(settings: Settings):
        with real(settings) as uow:
            yield uow
        if not lost:
            lost.append(1)
            raise OperationalError("COMMIT", {}, psycopg.OperationalError(
                "server closed the connection unexpectedly"), connection_invalidated=True)

    monkeypatch.setattr(units, "unit_of_work", answer_lost_once)
    result = run_start(settings, user, "project_creation")
    assert lost, "the commit's answer was never lost"
    assert (result.status, result.token, result.held) == ("accessible", 4, 1)
    with session_scope(db) as s:
        assert s.scalars(select(Hold.id).where(Hold.user_id == user)).all() == [result.hold_id]
    assert_verified(db)
