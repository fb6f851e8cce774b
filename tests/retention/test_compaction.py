"""Retention: old entries folded into one CARRY_FORWARD per wallet, archived as they were;
verify holds before, during and after, balances as of any moment from the cut-off on are
what they were, and a late redelivery is recognized within the stated bound."""

from __future__ import annotations

import json
import random
import threading
import time
from datetime import datetime, timedelta

import pytest
from pydantic import SecretStr
from sqlalchemy import text

from tests.retention.test_erasure import rows_naming
from tests.support import Worker, apply, assert_verified, run_cli, session_scope, wait_for
from tokenledger import LedgerClient, Settings
from tokenledger.db.uow import unit_of_work
from tokenledger.errors import ValidationFailed
from tokenledger.ledger.reports import balance_as_of, history, monthly_report
from tokenledger.ledger.verify import verify
from tokenledger.retention.compaction import compact
from tokenledger.timeutil import utcnow

pytestmark = pytest.mark.services

DAY = timedelta(days=1)


def entries(settings: Settings, user: str) -> list[tuple[str, int, int, int]]:
    """(type, amount, balance_before, balance_after) of the account's entries, in order."""
    with session_scope(settings) as session:
        return [(r.type, r.amount, r.balance_before, r.balance_after) for r in session.execute(
            text("SELECT e.type, e.amount, e.balance_before, e.balance_after"
                 " FROM ledger_entries e JOIN accounts a ON a.id = e.account_id"
                 " WHERE a.user_id = :u ORDER BY e.id"), {"u": user})]


def backdate_outcomes(settings: Settings) -> None:
    """Date each stored outcome at its entries' date, as if it had been stored then (the
    ledger stores an outcome at the moment of its commit; these tests write history)."""
    with session_scope(settings) as session:
        session.execute(text(
            "UPDATE event_outcomes AS o SET created_at = e.at FROM (SELECT event_key,"
            " min(created_at) AS at FROM ledger_entries GROUP BY event_key) AS e"
            " WHERE e.event_key = o.key"))


def test_old_entries_fold_into_one_carry_forward_per_wallet(db: Settings) -> None:
    """Given a year of charges and credits on two wallets, when entries older than 100 days
    are compacted: each wallet opens with one CARRY_FORWARD equal to what it folded, the
    archive holds those entries as they were, verify passes, a balance as of any moment
    from the cut-off on is unchanged, and before it is refused; a second run folds
    nothing."""
    now = utcnow()
    start = now - 365 * DAY
    apply(db, {"type": "open_account", "key": "open:ann", "user_id": "ann",
               "plan": "Professional"}, now=start)
    for day in range(1, 360, 7):
        apply(db, {"type": "charge", "key": f"c{day}", "user_id": "ann", "amount": 3,
                   "metadata": {"note": "a private note"}}, now=start + day * DAY)
        if day % 3 == 0:
            apply(db, {"type": "credit", "key": f"k{day}", "user_id": "ann", "amount": 5,
                       "wallet_type": "PREMIUM"}, now=start + day * DAY)
    moments = [now - 100 * DAY, now - 99 * DAY, now - 30 * DAY, now - DAY, now]
    with unit_of_work(db) as uow:
        before = {m: balance_as_of(uow.session, "ann", m) for m in moments}
        all_entries = len(history(uow.session, "ann", limit=1000))
    assert_verified(db)

    dry = compact(db, 100 * DAY, dry_run=True, now=now)
    assert (dry.dry_run, dry.wallets, dry.carry_forwards) == (True, 2, 2)
    assert len(entries(db, "ann")) == all_entries  # a dry run changes nothing

    report = compact(db, 100 * DAY, now=now, chunk_size=1)
    assert (report.status, report.wallets, report.carry_forwards) == ("completed", 2, 2)
    assert report.entries_archived == dry.entries_archived > 40
    folded = entries(db, "ann")
    assert len(folded) == all_entries - report.entries_archived + 2
    with session_scope(db) as session:
        firsts = session.execute(text(
            "SELECT DISTINCT ON (wallet_id) wallet_id, type, amount, balance_before"
            " FROM ledger_entries ORDER BY wallet_id, id")).all()
        archived = dict(session.execute(text(
            "SELECT carried_into, sum(amount) FROM ledger_entries_archive"
            " GROUP BY carried_into")).all())
        carries = dict(session.execute(text(
            "SELECT id, amount FROM ledger_entries WHERE type = 'CARRY_FORWARD'")).all())
    assert [(t, b) for _, t, _, b in firsts] == [("CARRY_FORWARD", 0)] * 2
    assert archived == carries
    assert_verified(db)
    with unit_of_work(db) as uow:
        after = {m: balance_as_of(uow.session, "ann", m) for m in moments}
        with pytest.raises(ValidationFailed, match="^at: .* before the retention cut-off"):
            balance_as_of(uow.session, "ann", now - 101 * DAY)
        with pytest.raises(ValidationFailed, match="^month: "):
            monthly_report(uow.session, "ann", (now - 200 * DAY).strftime("%Y-%m"), now)
    assert after == before

    again = compact(db, 100 * DAY, now=now + timedelta(seconds=1))
    assert (again.wallets, again.entries_archived) == (0, 0)
    assert len(entries(db, "ann")) == len(folded)

    # An erasure reaches the archive too.
    erasing = db.model_copy(update={"erasure_secret": SecretStr("s")})
    assert "ledger_entries_archive" in rows_naming(db, "a private note")
    LedgerClient(erasing).erase_account("ann")
    assert rows_naming(db, "a private note") == {} and rows_naming(db, "ann") == {}
    assert_verified(db)


def test_a_late_redelivery_is_recognized_within_older_than_plus_the_grace(
        db: Settings) -> None:
    """Compacting at 400 days with the default 30-day grace: an event first applied 410
    days ago has no entries left but its outcome stays, so its redelivery is a duplicate
    and changes nothing (and a refund of it is refused, clearly); one applied 500 days
    ago is past the bound (430 days): its outcome is archived, and a redelivery would be
    applied as new."""
    now = utcnow()
    apply(db, {"type": "open_account", "key": "open:bo", "user_id": "bo",
               "plan": "Professional"}, now=now - 501 * DAY)
    old = {"type": "charge", "key": "old", "user_id": "bo", "amount": 7}
    late = {"type": "charge", "key": "late", "user_id": "bo", "amount": 11}
    apply(db, old, now=now - 500 * DAY)
    apply(db, late, now=now - 410 * DAY)
    backdate_outcomes(db)
    report = compact(db, 400 * DAY, now=now)
    assert report.key_cutoff == now - 430 * DAY
    assert report.outcomes_archived == 2  # "open:bo" and "old"
    assert_verified(db)
    balance = LedgerClient(db).balance("bo").balance

    (redelivered,) = apply(db, late).results
    assert (redelivered.status, redelivered.data["outcome"]) == ("duplicate", "applied")
    (refund,) = apply(db, {"type": "refund", "key": "r", "user_id": "bo",
                           "original_key": "late"}).results
    assert refund.status == "rejected" and "retention cut-off" in refund.reason
    assert LedgerClient(db).balance("bo").balance == balance
    with session_scope(db) as session:
        kept = session.scalars(text("SELECT key FROM event_outcomes_archive ORDER BY key"))
        assert list(kept) == ["old", "open:bo"]
    (again,) = apply(db, old).results
    assert again.status == "applied"  # past the bound: no longer recognized
    assert LedgerClient(db).balance("bo").balance == balance - 7
    assert_verified(db)


def test_compaction_beside_a_live_stream_keeps_verify_and_past_balances(
        settings: Settings, db: Settings, worker: Worker, client: LedgerClient) -> None:
    """Given 24 accounts with 90 days of history, when they are compacted at 30 days in
    chunks of 3 accounts while a worker applies a live stream of charges and credits to
    them and verify runs in a loop: every verify passes, every live event applies once,
    and each account's balance as of four past moments from the cut-off on is the same
    before and after, from the CLI too."""
    rng = random.Random(19)
    now = utcnow()
    users = [f"live-{i:02d}" for i in range(24)]
    for user in users:
        apply(db, {"type": "open_account", "key": f"open:{user}", "user_id": user,
                   "plan": "Business"}, now=now - 90 * DAY)
        for day in range(89, 0, -4):
            apply(db, {"type": "charge", "key": f"{user}-c{day}", "user_id": user,
                       "amount": rng.randint(1, 30)}, now=now - day * DAY)
    moments = [now - 30 * DAY + timedelta(hours=1), now - 29 * DAY, now - 7 * DAY,
               now - timedelta(minutes=1)]
    with unit_of_work(db) as uow:
        before = {(u, m): balance_as_of(uow.session, u, m).balance
                  for u in users for m in moments}

    stop = threading.Event()
    problems: list[object] = []
    verified = [0]

    def verify_loop() -> None:
        while not stop.is_set():
            with session_scope(db) as session:
                report = verify(session)
            if not report.ok:
                problems.append(report.as_dict())
            verified[0] += 1

    keys: list[str] = []

    def stream() -> None:
        while not stop.is_set():
            user = rng.choice(users)
            if rng.random() < 0.8:
                keys.append(client.charge(user, amount=rng.randint(1, 5)))
            else:
                keys.append(client.credit(user, rng.randint(1, 20), wallet_type="STANDARD"))
            time.sleep(0.005)

    threads = [threading.Thread(target=verify_loop), threading.Thread(target=stream)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        report = compact(db, 30 * DAY, chunk_size=3)
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert report.status == "completed" and report.carry_forwards == len(users)
    assert report.chunks >= 8
    outcomes = wait_for(client, keys, timeout=120)
    assert {o.status for o in outcomes.values()} == {"applied"} and len(keys) > 50
    assert problems == [] and verified[0] >= 2
    assert_verified(db)
    with unit_of_work(db) as uow:
        after = {(u, m): balance_as_of(uow.session, u, m).balance
                 for u in users for m in moments}
    assert after == before
    shown = run_cli(db, "balance", users[0], "--at", moments[2].isoformat(), "--json")
    assert shown.exit_code == 0, shown.stderr
    assert json.loads(shown.stdout)["balance"] == before[(users[0], moments[2])]
    early = run_cli(db, "balance", users[0], "--at", (now - 31 * DAY).isoformat())
    assert early.exit_code == 2 and "at:" in early.stderr and "cut-off" in early.stderr


def test_retention_compact_from_the_command_line(db: Settings) -> None:
    now = utcnow()
    apply(db, {"type": "open_account", "key": "open:cy", "user_id": "cy"}, now=now - 9 * DAY)
    apply(db, {"type": "charge", "key": "c1", "user_id": "cy", "amount": 2},
          now=now - 8 * DAY)
    dry = run_cli(db, "retention", "compact", "--older-than", "5d", "--dry-run", "--json")
    assert dry.exit_code == 0, dry.stderr
    assert (json.loads(dry.stdout)["entries_archived"], len(entries(db, "cy"))) == (2, 2)
    done = run_cli(db, "retention", "compact", "--older-than", "5d")
    assert done.exit_code == 0 and "folded 2 entries" in " ".join(done.stdout.split())
    assert entries(db, "cy") == [("CARRY_FORWARD", 3, 0, 3)]
    assert run_cli(db, "verify").exit_code == 0
    bad = run_cli(db, "retention", "compact", "--older-than", "5 days")
    assert bad.exit_code == 2 and "older_than:" in bad.stderr
    bad = run_cli(db, "retention", "compact", "--older-than", "3h")
    assert bad.exit_code == 2 and "at least 1 day" in bad.stderr


def test_balance_at_shows_holds_apart(db: Settings) -> None:
    """A hold open at a moment has taken its credits from the wallet then: the wallet's
    balance excludes them and ``held`` shows them; once released they are back."""
    from tokenledger.messages import StartRequest
    from tokenledger.tokenprocess import service as token_process

    t0 = utcnow() - 2 * DAY
    apply(db, {"type": "open_account", "key": "open:di", "user_id": "di", "plan": "Gift"},
          now=t0)
    with unit_of_work(db, now=t0 + timedelta(hours=1)) as uow:
        hold = token_process.start(uow, StartRequest(
            user_id="di", feature_endpoint_id="image_generation"), "h")
    with unit_of_work(db, now=t0 + DAY) as uow:
        token_process.release_expired_holds(uow)
    client = LedgerClient(db)
    during = client.balance("di", at=t0 + timedelta(hours=2))
    assert (during.balance, during.held, during.wallets[0].held) == (90, 10, 10)
    assert hold.held == 10
    later = client.balance("di", at=t0 + DAY + timedelta(seconds=1))
    assert (later.balance, later.held) == (100, 0)
    assert client.balance("di", at=t0 - DAY).wallets == []  # no wallet yet
    with pytest.raises(ValidationFailed, match="^at:"):
        client.balance("di", at=datetime(1900, 1, 1))


def test_the_retention_bench_measures_a_compaction_that_changes_no_balance(
        db: Settings) -> None:
    """bench/retention.py's own steps on a small ledger (its --small mode, in the test
    database): the fill verifies clean, the compaction folds and archives, balances as of
    moments from the cut-off on are unchanged, verify is clean after."""
    import importlib.util

    from tests.support import ROOT

    spec = importlib.util.spec_from_file_location("bench_retention",
                                                  ROOT / "bench" / "retention.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.fill(db.ledger_url(), 40, 25, 500)
    result = bench.measure(db, 100, 7, ["bench-1", "bench-17", "bench-40"])
    assert result["verify_before_ok"] and result["verify_after_ok"]
    assert result["balances_as_of_unchanged"] and result["status"] == "completed"
    assert result["carry_forwards"] == 40 and result["chunks"] == 6
    assert result["entries_archived"] == result["archive_rows"] == 40 * 20
    assert result["entries_left"] == 40 * 25 - result["entries_archived"] + 40
    # Stored over 130 days ago (older than 100 days + 30 of grace), their entries folded:
    assert result["outcomes_archived"] == 40 * 19


def test_two_compactions_at_once_fold_each_entry_once(db: Settings) -> None:
    """Two compactions running together take turns per account (its advisory lock): each
    old entry is archived once, each wallet gets one carry-forward, verify passes."""
    now = utcnow()
    for i in range(12):
        apply(db, {"type": "open_account", "key": f"open:tw{i}", "user_id": f"tw{i}"},
              now=now - 50 * DAY)
        for day in range(40, 10, -5):
            apply(db, {"type": "charge", "key": f"tw{i}-{day}", "user_id": f"tw{i}",
                       "amount": 1, "allow_overdraft": True}, now=now - day * DAY)
    reports = []

    def run() -> None:
        reports.append(compact(db, 5 * DAY, chunk_size=2, now=now))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r.carry_forwards for r in reports) == 12
    assert sum(r.entries_archived for r in reports) == 12 * 7
    with session_scope(db) as session:
        assert session.scalar(text("SELECT count(*) FROM ledger_entries_archive")) == 12 * 7
    assert_verified(db)


def test_the_scheduled_compaction_task_runs_on_a_worker(settings: Settings, db: Settings,
                                                        worker: Worker) -> None:
    """What beat sends when TOKENLEDGER_RETENTION_ENABLED: tokenledger.compact_ledger."""
    from tokenledger.queue.producer import Producer

    now = utcnow()
    apply(db, {"type": "open_account", "key": "open:ev", "user_id": "ev"}, now=now - 9 * DAY)
    producer = Producer(settings)
    try:
        producer.send("tokenledger.compact_ledger", kwargs={"older_than": "5d"})
    finally:
        producer.close()
    deadline = time.monotonic() + 60
    while True:
        with session_scope(db) as session:
            run = session.execute(text("SELECT trigger, status, carry_forwards"
                                       " FROM retention_runs")).first()
        if run is not None and run.status != "running":
            break
        assert time.monotonic() < deadline, "no compaction ran"
        time.sleep(0.1)
    assert tuple(run) == ("beat", "completed", 1)
    assert entries(db, "ev") == [("CARRY_FORWARD", 5, 0, 5)]
