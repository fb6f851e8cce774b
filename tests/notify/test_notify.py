"""Balance notifications: published after commit only, once per low-balance crossing,
delivered to LedgerClient.on_balance_changed over Redis and to this process's
subscribers."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis
from sqlalchemy import func, select

from tests.support import Worker, session_scope
from tokenledger import LedgerClient, Settings
from tokenledger.db.uow import unit_of_work
from tokenledger.ledger.models import Account, LedgerEntry
from tokenledger.ledger.service import apply_events
from tokenledger.messages import parse_event
from tokenledger.notify import publisher
from tokenledger.notify import service as notify
from tokenledger.notify.models import LowBalanceState
from tokenledger.notify.service import BalanceNotice
from tokenledger.timeutil import utcnow

pytestmark = pytest.mark.services


class Inbox:
    """Collects notices from a callback thread; waits for the ones a test expects."""

    def __init__(self) -> None:
        self.items: list[BalanceNotice] = []
        self.cond = threading.Condition()

    def __call__(self, notice: BalanceNotice) -> None:
        with self.cond:
            self.items.append(notice)
            self.cond.notify_all()

    def of(self, user_id: str) -> list[BalanceNotice]:
        with self.cond:
            return [n for n in self.items if n.user_id == user_id]

    def wait(self, predicate: Callable[[], bool], timeout: float = 30) -> bool:
        with self.cond:
            return self.cond.wait_for(predicate, timeout)


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def own(settings: Settings) -> Settings:
    """This module's queue and channels, so other runs on the same Redis never interfere."""
    tag = uuid.uuid4().hex[:8]
    return settings.model_copy(update={"queue": f"{settings.queue}-notify",
                                       "notify_channel_prefix": f"tltest-{tag}:"})


@pytest.fixture(scope="module")
def notify_worker(own: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    w = Worker(own, tmp_path_factory.mktemp("notify"), concurrency=2, extra_env={
        "TOKENLEDGER_NOTIFY_CHANNEL_PREFIX": own.notify_channel_prefix}).start()
    yield w
    w.stop()


@pytest.fixture
def sdk(own: Settings, db: Settings) -> Iterator[LedgerClient]:
    with LedgerClient(own) as client:
        yield client


def ledger_seq(url: str, user_id: str) -> int:
    with session_scope(url) as session:
        return session.scalar(select(func.max(LedgerEntry.id)).join(
            Account, Account.id == LedgerEntry.account_id).where(Account.user_id == user_id))


def apply_and_stage(settings: Settings, *events: dict, fail: bool = False, now=None) -> None:
    """What a worker does in its unit of work (notices published once it commits);
    ``fail`` raises before the commit."""
    with unit_of_work(settings, now=now) as uow:
        apply_events(uow, [parse_event(e) for e in events])
        if fail:
            raise RuntimeError("rolled back on purpose")
    assert publisher.flush_published(10)


def test_a_change_committed_by_the_worker_reaches_on_balance_changed(notify_worker, sdk):
    inbox = Inbox()
    assert sdk.on_balance_changed(inbox) is inbox
    user = uid("cache")
    sdk.open_account(user)  # committed in this process: published too
    assert inbox.wait(lambda: len(inbox.of(user)) == 1)
    key = sdk.charge(user, amount=2)
    assert sdk.result(key, timeout=30).status == "applied"
    assert inbox.wait(lambda: len(inbox.of(user)) == 2)
    opened, charged = inbox.of(user)
    assert (opened.event, opened.balance) == ("balance_changed", 5)
    assert (charged.event, charged.balance) == ("balance_changed", 3)
    assert charged.ledger_seq == ledger_seq(sdk.settings, user)
    assert charged.ledger_seq > opened.ledger_seq


def test_a_rolled_back_change_notifies_nobody(own, sdk):
    remote, local = Inbox(), Inbox()
    sdk.on_balance_changed(remote)
    unsubscribe = notify.subscribe(local)
    try:
        rolled, committed = uid("rolled"), uid("committed")
        with pytest.raises(RuntimeError, match="on purpose"):
            apply_and_stage(own, {"type": "open_account", "key": f"open:{rolled}",
                                  "user_id": rolled}, fail=True)
        apply_and_stage(own, {"type": "open_account", "key": f"open:{committed}",
                              "user_id": committed})
        # Published after the rolled-back attempt on the same connection: once this one is
        # here, the other would have arrived before it.
        assert remote.wait(lambda: len(remote.of(committed)) == 1)
        assert remote.of(rolled) == []
        assert [n.user_id for n in local.items] == [committed]
        with session_scope(own) as session:
            assert session.scalar(select(Account).where(Account.user_id == rolled)) is None
    finally:
        unsubscribe()


def test_low_balance_is_published_once_per_crossing_and_rearmed_above(notify_worker, sdk):
    lows = Inbox()
    sdk.on_balance_low(lows)
    user = uid("low")  # Free plan: 5 tokens, threshold 1
    sdk.open_account(user)
    steps = [("charge", 2, 3), ("charge", 2, 1), ("charge", 1, 0), ("credit", 9, 9),
             ("charge", 8, 1), ("charge", 1, 0)]
    for kind, amount, balance in steps:
        key = (sdk.charge(user, amount=amount) if kind == "charge"
               else sdk.credit(user, amount, wallet_type="STANDARD"))
        result = sdk.result(key, timeout=30)
        assert (result.status, result.data["balance"]) == ("applied", balance)
    assert lows.wait(lambda: len(lows.of(user)) >= 2)
    time.sleep(0.5)  # nothing else may follow
    crossings = lows.of(user)
    assert [(n.event, n.balance, n.threshold) for n in crossings] == [
        ("balance_low", 1, 1), ("balance_low", 1, 1)]
    with session_scope(sdk.settings) as session:
        state = session.get(LowBalanceState, user)
        assert (state.balance, state.threshold) == (1, 1)  # still low, not re-notified at 0


def test_crossing_state_is_shared_by_separate_units_of_work(own, db):
    lows = Inbox()
    unsubscribe = notify.subscribe(lows, events=[notify.BALANCE_LOW])
    user = uid("shared")
    try:
        apply_and_stage(own, {"type": "open_account", "key": f"open:{user}", "user_id": user})
        apply_and_stage(own, {"type": "charge", "key": f"{user}-1", "user_id": user,
                              "amount": 4})
        apply_and_stage(own, {"type": "charge", "key": f"{user}-2", "user_id": user,
                              "amount": 1})
        assert [(n.balance, n.threshold) for n in lows.of(user)] == [(1, 1)]
        # A crossing staged in a transaction that rolls back leaves the state untouched.
        apply_and_stage(own, {"type": "credit", "key": f"{user}-3", "user_id": user,
                              "amount": 10, "wallet_type": "STANDARD"})
        with pytest.raises(RuntimeError):
            apply_and_stage(own, {"type": "charge", "key": f"{user}-4", "user_id": user,
                                  "amount": 10}, fail=True)
        apply_and_stage(own, {"type": "charge", "key": f"{user}-5", "user_id": user,
                              "amount": 9})
        assert [(n.balance, n.threshold) for n in lows.of(user)] == [(1, 1), (1, 1)]
    finally:
        unsubscribe()


def test_stale_and_repeated_notices_are_not_delivered(own, sdk):
    inbox = Inbox()
    sdk.on_balance_changed(inbox)
    user = uid("stale")
    notices = [BalanceNotice("balance_changed", user, b, seq) for b, seq in
               ((10, 100), (12, 90), (10, 100), (7, 101))]
    publisher.publish(own, notices)
    assert inbox.wait(lambda: len(inbox.of(user)) >= 2)
    time.sleep(0.3)
    assert [(n.balance, n.ledger_seq) for n in inbox.of(user)] == [(10, 100), (7, 101)]


def test_the_subscriber_reconnects_when_redis_drops_it(own, sdk):
    inbox = Inbox()
    sdk.on_balance_changed(inbox)
    subscriber = sdk.__dict__["_notify_subscriber"]
    admin = redis.Redis.from_url(own.broker())
    mine = [c for c in admin.client_list() if c.get("name") == subscriber.client_name]
    assert len(mine) == 1
    admin.client_kill_filter(_id=mine[0]["id"])
    user = uid("reconnect")
    deadline = time.monotonic() + 30
    seq = 0
    # Notices published while it is disconnected are lost (pub/sub): keep publishing.
    while not inbox.of(user) and time.monotonic() < deadline:
        seq += 1
        publisher.publish(own, [BalanceNotice("balance_changed", user, 1, seq)])
        inbox.wait(lambda: bool(inbox.of(user)), timeout=0.2)
    assert inbox.of(user), "no notice after the connection was killed"
    assert subscriber.reconnects >= 1


def test_close_stops_the_subscriber_thread(own, db):
    client = LedgerClient(own)
    client.on_balance_changed(lambda _: None)
    thread = client.__dict__["_notify_subscriber"]._thread
    assert thread.is_alive() and thread.daemon
    client.close()
    assert not thread.is_alive()


def test_without_redis_subscribers_in_the_same_process_are_told(own, db):
    local = own.model_copy(update={"notify_enabled": False})
    inbox = Inbox()
    with LedgerClient(local) as client:
        client.on_balance_changed(inbox)
        assert "_notify_subscriber" not in client.__dict__  # no thread, no Redis
        client.open_account("offline")
        assert publisher.flush_published(10)
    client.open_account("after-close")  # unsubscribed by close()
    assert publisher.flush_published(10)
    assert [(n.user_id, n.balance) for n in inbox.items] == [("offline", 5)]


# -- system grants: renewals, daily resets, wallet expiry ---------------------------------


def entry_ids(url: str, entry_type: str) -> dict[str, int]:
    """Each user's newest entry of ``entry_type``: its ledger_seq."""
    with session_scope(url) as session:
        return dict(session.execute(
            select(Account.user_id, func.max(LedgerEntry.id))
            .join(LedgerEntry, LedgerEntry.account_id == Account.id)
            .where(LedgerEntry.type == entry_type).group_by(Account.user_id)).all())


def stage_at(settings: Settings, now, *events: dict) -> None:
    """apply_and_stage at a given instant."""
    apply_and_stage(settings, *events, now=now)


def run_inline(settings: Settings, kind: str, now, **options) -> None:
    from tokenledger.renewals import runs as runner
    from tokenledger.renewals.service import RunOptions

    _, chunk_ids = runner.start_run(settings, RunOptions(kind=kind, **options), now=now)
    runner.execute_inline(settings, chunk_ids)
    assert publisher.flush_published(10)


def system_grants_notify(settings: Settings, url: str) -> None:
    """Monthly renewal, daily reset and wallet expiry each tell every account they moved,
    after commit, with its new balance and the grant's entry as ledger_seq; a dry run and
    a repeated run tell nobody; a grant that lifts a low account re-arms its crossing, one
    that leaves it low keeps it marked (and says nothing more)."""
    from datetime import timedelta

    from tokenledger.renewals import runs as runner

    t0 = utcnow() - timedelta(days=40)
    inbox = Inbox()
    unsubscribe = notify.subscribe(inbox)
    try:
        stage_at(settings, t0, *[{"type": "open_account", "key": f"open:{u}", "user_id": u,
                                  "plan": plan} for u, plan in
                                 (("gift", "Gift"), ("pro", "Professional"), ("free", "Free"),
                                  ("gift-low", "Gift"), ("pro-deep", "Professional"))])
        stage_at(settings, t0, {"type": "charge", "key": "spend", "user_id": "gift",
                                "amount": 60},
                 {"type": "charge", "key": "drain", "user_id": "free", "amount": 5},
                 {"type": "charge", "key": "low", "user_id": "gift-low", "amount": 95},
                 {"type": "charge", "key": "deep", "user_id": "pro-deep", "amount": 3950,
                  "allow_overdraft": True},
                 {"type": "credit", "key": "promo", "user_id": "pro", "amount": 30,
                  "wallet_type": "PROMO", "expires_at": (t0 + timedelta(days=45)).isoformat()})
        assert [n.balance for n in inbox.of("free")] == [5, 0, 0]  # opened, drained, low
        assert [n.event for n in inbox.of("gift-low")][-1] == "balance_low"
        assert [n.event for n in inbox.of("pro-deep")][-1] == "balance_low"
        inbox.items.clear()

        month = t0 + timedelta(days=31)
        run_inline(settings, "monthly", month, dry_run=True)
        assert inbox.items == []
        run_inline(settings, "monthly", month)
        seqs = entry_ids(url, "RENEWAL")
        got = {n.user_id: (n.event, n.balance, n.ledger_seq) for n in inbox.items}
        # Gift resets 40 -> 100; Professional tops up 2000 + 2000, plus its live promo;
        # the low Gift account is lifted above 10, the overdrawn Professional one stays
        # at or below 100 (-1950 + 2000): told its balance, no second balance_low.
        assert got == {"gift": ("balance_changed", 100, seqs["gift"]),
                       "pro": ("balance_changed", 4030, seqs["pro"]),
                       "gift-low": ("balance_changed", 100, seqs["gift-low"]),
                       "pro-deep": ("balance_changed", 50, seqs["pro-deep"])}
        assert len(inbox.items) == 4
        with session_scope(url) as session:
            assert session.get(LowBalanceState, "gift-low") is None  # re-armed
            assert session.get(LowBalanceState, "pro-deep") is not None  # still low
        run_inline(settings, "monthly", month)  # nothing granted twice, nobody told twice
        assert len(inbox.items) == 4

        inbox.items.clear()
        run_inline(settings, "daily", t0 + timedelta(days=1, hours=1))
        assert [(n.event, n.balance, n.ledger_seq) for n in inbox.items] == [
            ("balance_changed", 5, entry_ids(url, "DAILY_RESET")["free"])]
        with session_scope(url) as session:  # lifted above its threshold: re-armed
            assert session.get(LowBalanceState, "free") is None

        inbox.items.clear()
        result = runner.expire_batch(settings, t0 + timedelta(days=46))
        assert publisher.flush_published(10) and result.wallets == 1
        assert [(n.user_id, n.balance, n.ledger_seq) for n in inbox.items] == [
            ("pro", 4000, entry_ids(url, "EXPIRY")["pro"])]
    finally:
        unsubscribe()


def test_renewals_resets_and_expiry_notify_each_account_moved(own, db):
    remote = Inbox()
    with LedgerClient(own) as client:
        client.on_balance_changed(remote)
        system_grants_notify(own, db)
        # The same notices went over Redis to another subscriber.
        assert remote.wait(lambda: len(remote.of("pro")) >= 2)
    assert {n.user_id for n in remote.items} >= {"gift", "pro", "free"}
