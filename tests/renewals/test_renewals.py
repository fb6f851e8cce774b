"""Daily resets, monthly renewals, expiry and batch runs, against the real PostgreSQL.

Worked examples: *given* accounts opened at a known instant, *when* a run is started at
another instant, *then* exactly the accounts whose period turned are granted, once.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from tests.support import ROOT, apply, assert_verified, session_scope
from tokenledger import Settings
from tokenledger.catalog.service import current_catalog
from tokenledger.db.engine import get_engine
from tokenledger.db.uow import UnitOfWork, unit_of_work
from tokenledger.ledger.models import EventOutcome, LedgerEntry
from tokenledger.queue.producer import Producer
from tokenledger.renewals import runs as runner
from tokenledger.renewals.expiry import expire_wallets
from tokenledger.renewals.service import (
    RunOptions,
    eligibility,
    plan_run,
    process_chunk,
    run_report,
)
from tokenledger.webhooks import relay

pytestmark = pytest.mark.services

T0 = datetime(2026, 3, 7, 12, 0, tzinfo=UTC)


def open_accounts(url: Settings, specs: list[tuple[str, str, str]], now: datetime) -> None:
    apply(url, *[{"type": "open_account", "key": f"open-{u}", "user_id": u, "plan": plan,
                  "timezone": tz} for u, plan, tz in specs], now=now)


def charge(url: Settings, user: str, amount: int, now: datetime, overdraft: bool = False) -> None:
    result = apply(url, {"type": "charge", "key": f"c-{user}-{now.isoformat()}-{amount}",
                         "user_id": user, "amount": amount, "allow_overdraft": overdraft},
                   now=now)
    assert result.results[0].status == "applied", result.results


def run(settings: Settings, kind: str, now: datetime, **options: Any) -> dict[str, Any]:
    """Plan and process a run in this process; its sealed report."""
    run_id, chunk_ids = runner.start_run(settings, RunOptions(kind=kind, **options), now=now)
    runner.execute_inline(settings, chunk_ids)
    with session_scope(settings) as session:
        return run_report(session, run_id)


def standard(url: Settings, user: str) -> int:
    with session_scope(url) as session:
        return session.execute(text(
            "SELECT w.balance FROM wallets w JOIN accounts a ON a.id = w.account_id"
            " WHERE a.user_id = :u AND w.wallet_type = 'STANDARD'"), {"u": user}).scalar_one()


def entries(url: Settings, type_: str) -> list[Any]:
    with session_scope(url) as session:
        return list(session.execute(text(
            "SELECT a.user_id, e.amount, e.balance_before, e.balance_after, e.event_key"
            " FROM ledger_entries e JOIN accounts a ON a.id = e.account_id"
            " WHERE e.type = :t ORDER BY e.id"), {"t": type_}))


def granted_users(report: dict[str, Any]) -> set[str]:
    return {c["user_id"] for c in report.get("changes", [])}


# -- daily reset ---------------------------------------------------------------------------


def test_daily_reset_follows_each_accounts_local_midnight(settings: Settings, db: Settings) -> None:
    # Opened 2026-03-07 12:00 UTC: Bangkok (UTC+7) is at 19:00 on the 7th, Kiritimati
    # (UTC+14) at 02:00 on the 8th, New York (UTC-5) at 07:00 on the 7th.
    open_accounts(db, [("bkk", "Free", "Asia/Bangkok"), ("kiri", "Free", "Pacific/Kiritimati"),
                       ("nyc", "Free", "America/New_York"), ("utc", "Free", "UTC")], T0)
    for user in ("bkk", "kiri", "nyc", "utc"):
        charge(db, user, 3, T0 + timedelta(minutes=1))

    # 16:59 UTC: Bangkok 23:59 (same day), Kiritimati 06:59 on the 8th (opened on the 8th).
    report = run(settings, "daily", datetime(2026, 3, 7, 16, 59, tzinfo=UTC))
    assert report["total_processed"] == 0 and report["status"] == "completed"
    # 17:00 UTC: Bangkok's midnight.
    report = run(settings, "daily", datetime(2026, 3, 7, 17, 0, tzinfo=UTC))
    assert (report["successful"], report["tokens_granted"]) == (1, 3)
    assert standard(db, "bkk") == 5 and standard(db, "utc") == 2
    # 2026-03-08 00:00 UTC: UTC's midnight.
    assert run(settings, "daily", datetime(2026, 3, 8, 0, 0, tzinfo=UTC))["successful"] == 1
    assert standard(db, "utc") == 5 and standard(db, "kiri") == 2
    # 09:59 UTC: New York passed its midnight at 05:00 UTC (EDT began that night);
    # Kiritimati is at 23:59. 10:00 UTC: Kiritimati's midnight (the 9th there).
    assert run(settings, "daily", datetime(2026, 3, 8, 9, 59, tzinfo=UTC))["successful"] == 1
    assert standard(db, "nyc") == 5 and standard(db, "kiri") == 2
    assert run(settings, "daily", datetime(2026, 3, 8, 10, 0, tzinfo=UTC))["successful"] == 1
    assert standard(db, "kiri") == 5
    resets = entries(db, "DAILY_RESET")
    assert [(r.user_id, r.amount, r.balance_before, r.balance_after) for r in resets] == [
        ("bkk", 3, 2, 5), ("utc", 3, 2, 5), ("nyc", 3, 2, 5), ("kiri", 3, 2, 5)]
    assert resets[0].event_key.startswith("reset:") and resets[0].event_key.endswith(
        ":2026-03-08")
    assert_verified(db)


@pytest.mark.parametrize(("day", "before_midnight", "midnight"), [
    # DST starts 2026-03-08 in New York: the 8th has 23 hours, midnight moves to 04:00 UTC.
    ("2026-03-08", datetime(2026, 3, 9, 3, 59, tzinfo=UTC), datetime(2026, 3, 9, 4, 0, tzinfo=UTC)),
    # DST ends 2026-11-01: the 1st has 25 hours, midnight moves to 05:00 UTC.
    ("2026-11-01", datetime(2026, 11, 2, 4, 59, tzinfo=UTC),
     datetime(2026, 11, 2, 5, 0, tzinfo=UTC)),
])
def test_daily_reset_is_dst_safe_in_new_york(settings: Settings, db: Settings, day: str,
                                             before_midnight: datetime,
                                             midnight: datetime) -> None:
    opened = datetime.fromisoformat(f"{day}T16:00:00+00:00")  # noon-ish on the change day
    open_accounts(db, [("ny", "Free", "America/New_York")], opened)
    # Hourly ticks through the change day and past the next midnight: exactly one reset.
    granted = []
    tick = opened
    while tick <= midnight + timedelta(hours=3):
        charge(db, "ny", 1, tick, overdraft=True)
        report = run(settings, "daily", tick)
        granted.append((tick, report["successful"]))
        tick += timedelta(hours=1)
    assert [t for t, n in granted if n] == [midnight], granted
    assert run(settings, "daily", before_midnight)["successful"] == 0
    with session_scope(db) as session:
        e = eligibility(session, "ny", current_catalog(session), before_midnight)
    assert e.next_renewal_date == midnight
    assert_verified(db)


def test_daily_reset_writes_no_entry_when_already_at_the_allocation(settings: Settings,
                                                                    db: Settings) -> None:
    open_accounts(db, [("full", "Free", "UTC"), ("spent", "Free", "UTC"),
                       ("overdrawn", "Free", "UTC")], T0)
    charge(db, "spent", 5, T0)
    charge(db, "overdrawn", 12, T0, overdraft=True)
    report = run(settings, "daily", T0 + timedelta(days=1))
    assert (report["successful"], report["tokens_granted"]) == (3, 5 + 12)
    assert [(r.user_id, r.amount, r.balance_before) for r in entries(db, "DAILY_RESET")] == [
        ("spent", 5, 0), ("overdrawn", 12, -7)]
    # The period is recorded as done for all three: a second tick that day grants nothing.
    charge(db, "full", 2, T0 + timedelta(days=1, hours=1))
    assert run(settings, "daily", T0 + timedelta(days=1, hours=2))["total_processed"] == 0
    assert standard(db, "full") == 3
    assert_verified(db)


# -- monthly renewal -----------------------------------------------------------------------


def test_monthly_renewal_modes_and_rollover_cap(settings: Settings, db: Settings) -> None:
    open_accounts(db, [("gift", "Gift", "UTC"), ("pro", "Professional", "UTC"),
                       ("biz", "Business", "UTC"), ("free", "Free", "UTC")], T0)
    charge(db, "gift", 130, T0, overdraft=True)      # reset: -30 -> 100
    charge(db, "biz", 2500, T0)                      # topup: 7500 -> 17500
    assert run(settings, "monthly", T0 + timedelta(days=29, hours=23))["total_processed"] == 0

    report = run(settings, "monthly", T0 + timedelta(days=30))
    assert (report["successful"], report["failed"]) == (3, 0)
    assert (standard(db, "gift"), standard(db, "pro"), standard(db, "biz")) == (100, 4000, 17500)
    assert standard(db, "free") == 5  # daily plans are not renewed monthly
    # Next period: Professional is at its cap (no entry), Business tops up to its cap.
    report = run(settings, "monthly", T0 + timedelta(days=60, hours=5))
    assert (report["successful"], report["tokens_granted"]) == (3, 0 + 0 + 2500)
    assert standard(db, "biz") == 20000 and standard(db, "pro") == 4000
    renewals = [(r.user_id, r.amount, r.balance_before, r.balance_after)
                for r in entries(db, "RENEWAL")]
    assert renewals == [("gift", 130, -30, 100), ("pro", 2000, 2000, 4000),
                        ("biz", 10000, 7500, 17500), ("biz", 2500, 17500, 20000)]
    # The anchor is kept: the third period starts 60 days after opening, not 60d 5h.
    with session_scope(db) as session:
        e = eligibility(session, "biz", current_catalog(session), T0 + timedelta(days=61))
    assert not e.eligible and e.next_renewal_date == T0 + timedelta(days=90)
    assert e.days_until_renewal == 29
    assert_verified(db)


def test_tier_and_limit_select_the_accounts(settings: Settings, db: Settings) -> None:
    open_accounts(db, [(f"g{i}", "Gift", "UTC") for i in range(5)]
                  + [(f"p{i}", "Professional", "UTC") for i in range(3)], T0)
    later = T0 + timedelta(days=31)
    report = run(settings, "monthly", later, tier="Gift", limit=2, dry_run=True)
    assert report["candidates"] == 2 and granted_users(report) <= {f"g{i}" for i in range(5)}
    report = run(settings, "monthly", later, tier="Professional", chunk_size=2)
    assert (report["successful"], report["total_chunks"]) == (3, 2)
    report = run(settings, "monthly", later, limit=4, chunk_size=3)
    assert (report["successful"], report["candidates"]) == (4, 4)
    assert run(settings, "monthly", later)["successful"] == 1


def test_eligibility_reports_reason_and_next_date(settings: Settings, db: Settings) -> None:
    open_accounts(db, [("pro", "Professional", "UTC")], T0)
    with session_scope(db) as session:
        cat = current_catalog(session)
        early = eligibility(session, "pro", cat, T0 + timedelta(days=10))
        due = eligibility(session, "pro", cat, T0 + timedelta(days=31))
    assert (early.eligible, early.days_until_renewal) == (False, 20)
    assert early.next_renewal_date == T0 + timedelta(days=30) and "next on" in early.reason
    assert (due.eligible, due.days_until_renewal) == (True, 0) and "due" in due.reason


# -- at most once per period ---------------------------------------------------------------


def test_rerun_and_second_beat_grant_nothing_twice(settings: Settings, db: Settings) -> None:
    open_accounts(db, [(f"u{i}", "Gift", "UTC") for i in range(7)], T0)
    for i in range(7):
        charge(db, f"u{i}", 10 + i, T0)
    now = T0 + timedelta(days=30, hours=2)
    # Two beats planned the same window before either ran.
    a_id, a_chunks = runner.start_run(settings, RunOptions("monthly", chunk_size=3), now=now)
    b_id, b_chunks = runner.start_run(settings, RunOptions("monthly", chunk_size=2), now=now)
    runner.execute_inline(settings, a_chunks)
    runner.execute_inline(settings, b_chunks)
    # And a chunk delivered again after it committed.
    with unit_of_work(db) as uow:
        again = process_chunk(uow, a_chunks[0])
        a, b = run_report(uow.session, a_id), run_report(uow.session, b_id)
    assert again.already_done and again.processed == 0
    assert (a["successful"], b["successful"], b["skipped"] + b["total_processed"]) == (7, 0, 0)
    # A re-run later in the same period finds nothing due.
    assert run(settings, "monthly", now + timedelta(days=5))["total_processed"] == 0
    assert len(entries(db, "RENEWAL")) == 7
    assert_verified(db)


def test_grant_key_already_present_is_not_granted_again(settings: Settings, db: Settings) -> None:
    """Even if the period mark were lost, the per-period key stops a second grant."""
    open_accounts(db, [("g", "Gift", "UTC")], T0)
    charge(db, "g", 40, T0)
    now = T0 + timedelta(days=30)
    assert run(settings, "monthly", now)["successful"] == 1
    with session_scope(db) as session:  # an operator "fixes" the mark by hand
        session.execute(text("UPDATE accounts SET last_renewal_at = :t"), {"t": T0})
    charge(db, "g", 40, now + timedelta(hours=1))
    # In the same slice, an account never renewed: its grant still goes through.
    open_accounts(db, [("h", "Gift", "UTC")], T0)
    charge(db, "h", 30, T0)
    report = run(settings, "monthly", now + timedelta(hours=2))
    assert (report["successful"], report["skipped"]) == (1, 1)
    assert standard(db, "g") == 60 and standard(db, "h") == 100
    assert [(r.amount, r.balance_before) for r in entries(db, "RENEWAL")] == [(40, 60),
                                                                              (30, 70)]
    assert_verified(db)


# -- dry runs, errors and alerts -----------------------------------------------------------


def _snapshot(url: Settings) -> tuple[Any, ...]:
    with session_scope(url) as session:
        return (
            session.scalar(select(func.count()).select_from(LedgerEntry)),
            session.scalar(select(func.count()).select_from(EventOutcome)),
            tuple(session.execute(text("SELECT id, balance FROM wallets ORDER BY id"))),
            tuple(session.execute(text(
                "SELECT id, last_renewal_at, last_reset_on FROM accounts ORDER BY id"))),
        )


def test_dry_run_reports_changes_and_writes_nothing(settings: Settings, db: Settings) -> None:
    open_accounts(db, [("g", "Gift", "UTC"), ("p", "Professional", "UTC"),
                       ("f", "Free", "Asia/Bangkok")], T0)
    charge(db, "g", 25, T0)
    charge(db, "f", 4, T0)
    before = _snapshot(db)
    monthly = run(settings, "monthly", T0 + timedelta(days=31), dry_run=True)
    daily = run(settings, "daily", T0 + timedelta(days=1), dry_run=True)
    assert _snapshot(db) == before
    assert monthly["dry_run"] and monthly["successful"] == 2
    assert sorted((c["user_id"], c["balance_before"], c["balance_after"], c["amount"])
                  for c in monthly["changes"]) == [("g", 75, 100, 25), ("p", 2000, 4000, 2000)]
    assert [(c["user_id"], c["amount"]) for c in daily["changes"]] == [("f", 4)]
    # The real run afterwards does exactly what the dry run said.
    real = run(settings, "monthly", T0 + timedelta(days=31))
    assert real["tokens_granted"] == monthly["tokens_granted"] == 2025


def _break_wallets(url: Settings, users: list[str]) -> None:
    """A real data fault: the renewing wallet was deactivated (e.g. by a bad migration)."""
    with session_scope(url) as session:
        session.execute(text(
            "UPDATE wallets SET is_active = false WHERE wallet_type = 'STANDARD' AND account_id"
            " IN (SELECT id FROM accounts WHERE user_id = ANY(:users))"), {"users": users})


def test_continue_on_error_renews_the_rest_and_lists_errors(settings: Settings,
                                                            db: Settings) -> None:
    users = [f"u{i:02d}" for i in range(10)]
    open_accounts(db, [(u, "Gift", "UTC") for u in users], T0)
    _break_wallets(db, ["u03", "u07"])
    report = run(settings, "monthly", T0 + timedelta(days=30), chunk_size=4)
    assert (report["status"], report["total_processed"], report["successful"],
            report["failed"]) == ("completed", 10, 8, 2)
    assert [(e["user_id"], e["error"]) for e in report["errors"]] == [
        ("u03", "STANDARD wallet is inactive"), ("u07", "STANDARD wallet is inactive")]
    assert_verified(db)


def test_stop_on_error_stops_at_the_first_failing_account(settings: Settings,
                                                          db: Settings) -> None:
    users = [f"u{i:02d}" for i in range(10)]
    open_accounts(db, [(u, "Gift", "UTC") for u in users], T0)
    _break_wallets(db, ["u03", "u07"])
    report = run(settings, "monthly", T0 + timedelta(days=30), chunk_size=4,
                 continue_on_error=False)
    assert report["status"] == "stopped" and "u03" in report["message"]
    assert (report["successful"], report["failed"]) == (3, 1)
    assert [r.user_id for r in entries(db, "RENEWAL")] == []  # Gift at 100: reset is a no-op
    with session_scope(db) as session:
        renewed = set(session.scalars(text(
            "SELECT user_id FROM accounts WHERE last_renewal_at > :t"), {"t": T0}))
    assert renewed == {"u00", "u01", "u02"}


class _Receiver(BaseHTTPRequestHandler):
    received: list[dict[str, Any]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append({"content_type": self.headers["Content-Type"],
                                    "body": json.loads(body)})
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def webhook() -> Any:
    _Receiver.received = []
    server = HTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/alerts", _Receiver.received
    server.shutdown()
    server.server_close()


def _alerts_total() -> float:
    return REGISTRY.get_sample_value("tokenledger_renewal_alerts_total",
                                     {"kind": "monthly"}) or 0.0


def test_failures_above_the_ratio_post_a_critical_alert(settings: Settings, db: Settings,
                                                        webhook: Any,
                                                        caplog: pytest.LogCaptureFixture
                                                        ) -> None:
    url, received = webhook
    alerting = settings.model_copy(update={"alert_webhook_url": url,
                                           "alert_failure_ratio": 0.1})
    users = [f"u{i:02d}" for i in range(10)]
    open_accounts(db, [(u, "Gift", "UTC") for u in users], T0)
    _break_wallets(db, ["u01", "u05"])  # 2 failed > 0.1 × 8 successful
    metric_before = _alerts_total()
    with caplog.at_level("CRITICAL", logger="tokenledger.renewals"):
        report = run(alerting, "monthly", T0 + timedelta(days=30), chunk_size=3)
    assert (report["successful"], report["failed"], report["alert"]) == (8, 2, True)
    relay.deliver_due(alerting)  # what a worker's relay run does (or did, woken by the run)
    deadline = time.monotonic() + 30
    while True:
        with session_scope(db) as session:
            if run_report(session, report["id"])["alert_sent_at"] is not None:
                break
        assert time.monotonic() < deadline, "the alert was never delivered"
        time.sleep(0.1)
    assert len(received) == 1 and received[0]["content_type"] == "application/json"
    assert received[0]["body"]["type"] == "renewal_failure_alert"
    body = received[0]["body"]["data"]
    assert (body["alert"], body["severity"], body["run_id"], body["failed"],
            body["successful"]) == ("renewal_failure_rate", "critical", report["id"], 2, 8)
    assert {e["user_id"] for e in body["errors"]} == {"u01", "u05"}
    assert any(r.levelname == "CRITICAL" for r in caplog.records)
    assert _alerts_total() == metric_before + 1


def test_failures_within_the_ratio_do_not_alert(settings: Settings, db: Settings,
                                                webhook: Any) -> None:
    url, received = webhook
    alerting = settings.model_copy(update={"alert_webhook_url": url,
                                           "alert_failure_ratio": 0.5})
    open_accounts(db, [(f"u{i}", "Gift", "UTC") for i in range(10)], T0)
    _break_wallets(db, ["u1", "u2"])  # 2 failed <= 0.5 × 8
    report = run(alerting, "monthly", T0 + timedelta(days=30))
    relay.deliver_due(alerting)
    assert (report["failed"], report["alert"], received) == (2, False, [])


def test_an_unreachable_webhook_never_breaks_the_run(settings: Settings, db: Settings
                                                     ) -> None:
    down = settings.model_copy(update={"alert_webhook_url": "http://127.0.0.1:9/alerts"})
    open_accounts(db, [("a", "Gift", "UTC"), ("b", "Gift", "UTC")], T0)
    _break_wallets(db, ["a"])
    report = run(down, "monthly", T0 + timedelta(days=30))
    assert (report["status"], report["successful"], report["failed"]) == ("completed", 1, 1)
    relay.deliver_due(down)  # here, or in a worker woken by the run: either way, it failed
    with session_scope(db) as session:
        attempts, status, error = session.execute(text(
            "SELECT attempts, status, last_error FROM webhook_deliveries"
            " WHERE event_type = 'renewal_failure_alert'")).one()
        sealed = run_report(session, report["id"])
    assert attempts >= 1 and status == "pending" and "ConnectError" in error  # retried later
    assert sealed["alert"] is True and sealed["alert_sent_at"] is None


# -- expiry ----------------------------------------------------------------------------------


def test_expired_wallets_are_zeroed_once(settings: Settings, db: Settings) -> None:
    open_accounts(db, [("a", "Free", "UTC")], T0)
    soon, later = T0 + timedelta(days=1), T0 + timedelta(days=10)
    apply(db, {"type": "credit", "key": "promo", "user_id": "a", "amount": 30,
               "wallet_type": "PROMO", "expires_at": soon.isoformat()},
          {"type": "credit", "key": "premium", "user_id": "a", "amount": 7,
           "wallet_type": "PREMIUM", "expires_at": later.isoformat()}, now=T0)
    with unit_of_work(db, now=T0 + timedelta(hours=23)) as uow:
        assert expire_wallets(uow).wallets == 0
    with unit_of_work(db, now=soon + timedelta(minutes=5)) as uow:
        result = expire_wallets(uow)
    assert (result.wallets, result.tokens, result.more) == (1, 30, False)
    with unit_of_work(db, now=soon + timedelta(minutes=10)) as uow:
        assert expire_wallets(uow).wallets == 0
    assert [(r.amount, r.balance_after) for r in entries(db, "EXPIRY")] == [(-30, 0)]
    assert_verified(db)


# -- fan-out through a real worker ---------------------------------------------------------


def test_chunks_fan_out_to_a_real_worker_and_redelivery_changes_nothing(
        settings: Settings, db: Settings, worker: Any) -> None:
    users = [f"w{i:03d}" for i in range(60)]
    open_accounts(db, [(u, "Professional", "UTC") for u in users], T0)
    for u in users[:10]:
        charge(db, u, 1500, T0)
    now = T0 + timedelta(days=30, minutes=1)
    run_id, chunk_ids = runner.start_run(settings, RunOptions("monthly", chunk_size=7),
                                         now=now)
    assert len(chunk_ids) == 9
    runner.dispatch(settings, chunk_ids)
    runner.dispatch(settings, chunk_ids[:4])  # redelivered chunks
    report = runner.wait_for_run(settings, run_id, timeout=60)
    assert report["status"] == "completed", report
    assert (report["successful"], report["failed"], report["chunks_done"]) == (60, 0, 9)
    assert report["tokens_granted"] == 60 * 2000
    # The duplicates arrive after the run sealed: give the worker time to see them.
    runner.dispatch(settings, chunk_ids)
    runner.dispatch(settings, chunk_ids)
    time.sleep(2)
    with session_scope(db) as session:
        assert run_report(session, run_id)["successful"] == 60
    assert len(entries(db, "RENEWAL")) == 60
    assert_verified(db)


def test_batch_task_plans_and_fans_out_on_the_worker(settings: Settings, db: Settings,
                                                     worker: Any) -> None:
    open_accounts(db, [(f"f{i}", "Free", "Asia/Bangkok") for i in range(5)],
                  datetime.now(UTC) - timedelta(days=2))
    producer = Producer(settings)
    try:
        producer.send("tokenledger.renew_batch", kwargs={"kind": "daily", "trigger": "api"})
    finally:
        producer.close()

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with session_scope(db) as session:
            rows = session.execute(text(
                "SELECT id, finished_at, successful FROM renewal_runs")).all()
        if rows and rows[0].finished_at is not None:
            break
        time.sleep(0.2)
    assert rows and rows[0].successful == 5


def test_plan_run_counts_candidates_without_writing_grants(settings: Settings,
                                                            db: Settings) -> None:
    open_accounts(db, [(f"u{i}", "Gift", "UTC") for i in range(5)], T0)
    with unit_of_work(db, now=T0 + timedelta(days=30)) as uow:
        planned = plan_run(uow, RunOptions("monthly", chunk_size=2))
        assert (planned.candidates, planned.total_chunks, planned.status) == (5, 3, "running")


def test_live_charges_during_a_renewal_keep_the_ledger_consistent(settings: Settings,
                                                                  db: Settings) -> None:
    """The renewal reads each balance only after it holds the account's lock, so charges
    committed while it waited are in balance_before; verify stays clean."""
    users = [f"c{i:03d}" for i in range(200)]
    open_accounts(db, [(u, "Professional", "UTC") for u in users], T0)
    now = T0 + timedelta(days=30)
    stop = threading.Event()
    applied = []

    def charges() -> None:
        n = 0
        while not stop.is_set():
            batch = [{"type": "charge", "key": f"live-{n}-{i}", "user_id": users[(n * 7 + i) % 200],
                      "amount": 3} for i in range(20)]
            result = apply(db, *batch, now=now)
            applied.append(result.count("applied"))
            n += 1

    thread = threading.Thread(target=charges)
    thread.start()
    try:
        report = run(settings, "monthly", now, chunk_size=10)
    finally:
        stop.set()
        thread.join()
    assert report["successful"] == 200 and sum(applied) > 0
    assert_verified(db)


# -- slices, and what a grant leaves behind ------------------------------------------------


def test_a_chunk_commits_in_slices_and_a_crash_resumes_without_granting_twice(
        settings: Settings, db: Settings) -> None:
    users = [f"s{i:02d}" for i in range(11)]
    open_accounts(db, [(u, "Professional", "UTC") for u in users], T0)
    for i, u in enumerate(users):
        charge(db, u, 100 + i, T0)
    run_id, (chunk_id,) = runner.start_run(settings, RunOptions("monthly", chunk_size=50),
                                           now=T0 + timedelta(days=30))
    # The first slice commits on its own: its grants, its counts, the chunk's new cursor.
    with unit_of_work(db) as uow:
        first = process_chunk(uow, chunk_id, slice_size=4)
    assert (first.more, first.status, first.successful) == (True, "pending", 4)
    assert len(entries(db, "RENEWAL")) == 4
    with session_scope(db) as session:
        mid = run_report(session, run_id)
    assert (mid["finished_at"], mid["successful"]) == (None, 0)  # counted when the chunk ends
    # "The worker died here": the redelivered chunk resumes after the committed slice.
    result = runner.run_chunk(settings, chunk_id, slice_size=3)
    assert (result.more, result.finished, result.successful) == (False, True, 11)
    with session_scope(db) as session:
        report = run_report(session, run_id)
    assert (report["status"], report["successful"], report["tokens_granted"]) == (
        "completed", 11, 11 * 2000)
    assert sorted(r.user_id for r in entries(db, "RENEWAL")) == users
    assert runner.run_chunk(settings, chunk_id).already_done
    assert_verified(db)


def test_stop_on_error_inside_a_later_slice_stops_the_run(settings: Settings, db: Settings) -> None:
    users = [f"u{i:02d}" for i in range(10)]
    open_accounts(db, [(u, "Business", "UTC") for u in users], T0)
    _break_wallets(db, ["u06"])
    run_id, (chunk_id,) = runner.start_run(
        settings, RunOptions("monthly", chunk_size=10, continue_on_error=False),
        now=T0 + timedelta(days=30))
    result = runner.run_chunk(settings, chunk_id, slice_size=4)
    assert (result.finished, result.successful, result.failed) == (True, 6, 1)
    with session_scope(db) as session:
        report = run_report(session, run_id)
    assert report["status"] == "stopped" and "u06" in report["message"]
    assert [r.user_id for r in entries(db, "RENEWAL")] == users[:6]
    assert_verified(db)


def test_grants_leave_an_entry_and_a_mark_but_no_client_outcome(settings: Settings,
                                                                db: Settings) -> None:
    """System grants are not client events: the entry's unique key is their record, and
    a client event that happens to reuse a grant key is applied as its own event."""
    open_accounts(db, [("g", "Gift", "UTC")], T0)
    charge(db, "g", 30, T0)
    with session_scope(db) as session:
        outcomes_before = session.scalar(select(func.count()).select_from(EventOutcome))
    assert run(settings, "monthly", T0 + timedelta(days=30))["successful"] == 1
    (entry,) = entries(db, "RENEWAL")
    with session_scope(db) as session:
        assert session.scalar(select(func.count()).select_from(EventOutcome)) == outcomes_before
    result = apply(db, {"type": "charge", "key": entry.event_key, "user_id": "g",
                        "amount": 1}, now=T0 + timedelta(days=30, hours=1))
    assert result.results[0].status == "applied"
    assert standard(db, "g") == 99
    assert_verified(db)


def test_an_unknown_timezone_fails_loudly_in_the_daily_reset(settings: Settings,
                                                             db: Settings) -> None:
    open_accounts(db, [("ok", "Free", "UTC"), ("bad", "Free", "UTC")], T0)
    charge(db, "ok", 2, T0)
    with session_scope(db) as session:
        session.execute(text("UPDATE accounts SET timezone = 'Mars/Olympus_Mons'"
                             " WHERE user_id = 'bad'"))
    report = run(settings, "daily", T0 + timedelta(days=1))
    assert (report["successful"], report["failed"]) == (1, 1)
    assert report["errors"] == [{"user_id": "bad", "account_id": report["errors"][0][
        "account_id"], "error": "unknown timezone 'Mars/Olympus_Mons'"}]
    assert standard(db, "ok") == 5


def test_every_slice_is_planned_for_its_own_range(settings: Settings, db: Settings) -> None:
    """psycopg prepares a statement on its fifth run; PostgreSQL's generic plan for the
    slice statement guesses one row per CTE and joins them by nested loops, which is
    quadratic in the slice (a 1M-account renewal took minutes). Every slice must get a
    plan of its own, however many run on one connection."""
    users = [f"p{i:02d}" for i in range(24)]
    open_accounts(db, [(u, "Gift", "UTC") for u in users], T0)
    run_id, (chunk_id,) = runner.start_run(settings, RunOptions("monthly", chunk_size=50),
                                           now=T0 + timedelta(days=30))
    # 12 slices, each its own transaction, all on one connection (the pool would spread
    # them over whichever connections earlier tests left in it).
    with get_engine(db.ledger_url()).connect() as conn:
        while True:
            with Session(bind=conn) as session, session.begin():
                result = process_chunk(UnitOfWork(db, session, T0), chunk_id, slice_size=2)
            if not result.more:
                break
        plans = conn.execute(text(
            "SELECT generic_plans, custom_plans FROM pg_prepared_statements"
            " WHERE statement LIKE '%ins AS ( INSERT INTO ledger_entries%'")).all()
        conn.rollback()
    assert (result.finished, result.successful) == (True, 24)
    with session_scope(db) as session:
        assert run_report(session, run_id)["successful"] == 24
    assert plans, "the slice statement was never prepared: the test did not test anything"
    # Prepared on the fifth slice: the other (at least seven) each planned on their own.
    assert [(generic, custom >= 7) for generic, custom in plans] == [(0, True)]
    assert_verified(db)


def test_a_slice_updates_its_accounts_and_wallets_in_place(settings: Settings,
                                                            db: Settings) -> None:
    """A slice updates every account and STANDARD wallet on a page in one transaction, so
    each row needs room for a second version on its own page (migration 0008). A row
    that found none moved to another page and rewrote every index entry of its table."""
    open_accounts(db, [(f"h{i:03d}", "Gift", "UTC") for i in range(300)], T0)

    def pages() -> dict[str, dict[int, int]]:
        with session_scope(db) as session:
            return {table: dict(session.execute(text(
                f"SELECT id, (ctid::text::point)[0]::int FROM {table}")).all())
                for table in ("accounts", "wallets")}

    before = pages()
    assert len(before["accounts"]) == 300 and len(set(before["accounts"].values())) > 3
    report = run(settings, "monthly", T0 + timedelta(days=30), chunk_size=1000)
    assert report["successful"] == 300
    after = pages()
    moved = {table: sum(after[table][i] != page for i, page in rows.items())
             for table, rows in before.items()}
    assert moved == {"accounts": 0, "wallets": 0}
    assert_verified(db)


@pytest.mark.slow
def test_a_worker_killed_mid_run_leaves_a_run_that_completes_granting_each_account_once(
        settings: Settings, db: Settings, tmp_path: Path) -> None:
    """kill -9 of a worker (and its pool) while it renews: the chunks it had taken come
    back from Redis after the visibility timeout, a restarted worker finishes the run,
    and every account holds exactly one RENEWAL entry."""
    from tests.support import Worker

    crash = settings.model_copy(update={"queue": settings.queue + "-rkill",
                                        "visibility_timeout": 5})
    accounts = 60_000
    with session_scope(db) as session:  # due since yesterday; empty wallets, no entries
        session.execute(text(
            "INSERT INTO accounts (user_id, plan_code, timezone, created_at, last_renewal_at)"
            " SELECT 'k' || g, (ARRAY['Gift', 'Professional', 'Business'])[1 + g % 3], 'UTC',"
            " now() - interval '31 days', now() - interval '31 days'"
            " FROM generate_series(1, :n) AS g"), {"n": accounts})
        session.execute(text(
            "INSERT INTO wallets (account_id, wallet_type, balance, is_active, created_at)"
            " SELECT id, 'STANDARD', 0, true, now() FROM accounts"))
    run_id, chunk_ids = runner.start_run(crash, RunOptions("monthly", chunk_size=1000))
    assert len(chunk_ids) == 60

    def renewed() -> int:
        with session_scope(db) as session:
            return session.scalar(select(func.count()).select_from(LedgerEntry)
                                  .where(LedgerEntry.type == "RENEWAL"))

    worker = Worker(crash, tmp_path, concurrency=2).start()
    runner.dispatch(crash, chunk_ids)
    deadline = time.monotonic() + 60
    while renewed() == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    worker.kill(9)
    at_kill = renewed()
    assert 0 < at_kill < accounts, at_kill

    restarted = Worker(crash, tmp_path, concurrency=2).start()
    try:
        report = runner.wait_for_run(crash, run_id, timeout=90)
    finally:
        restarted.stop()
    assert (report["status"], report["successful"], report["failed"]) == (
        "completed", accounts, 0), report
    with session_scope(db) as session:
        per_account = session.execute(text(
            "SELECT count(*), count(DISTINCT account_id), coalesce(sum(amount), 0)"
            " FROM ledger_entries WHERE type = 'RENEWAL'")).one()
    assert tuple(per_account) == (accounts, accounts, report["tokens_granted"])
    assert_verified(db)


def _bench_module() -> Any:
    import importlib.util

    path = ROOT / "bench" / "renewals.py"
    spec = importlib.util.spec_from_file_location("bench_renewals", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_bench_yardstick_times_the_bare_writes_and_leaves_nothing_behind(db: Settings) -> None:
    """bench/renewals.py's write floor does a renewal's writes for every account (two
    connections, half each) and rolls them back: the ledger is as it was, and the writes
    really ran (the entry id sequence, which a rollback keeps, moved once per account)."""
    bench = _bench_module()
    bench.fill(db.ledger_url(), 301)
    drawn = "SELECT nextval('ledger_entries_id_seq')"
    with session_scope(db) as session:
        before = session.execute(text("SELECT id, last_renewal_at FROM accounts"
                                      " ORDER BY id")).all()
        first = session.scalar(text(drawn))
    seconds = bench.write_floor(db.ledger_url(), 301, 2)
    assert seconds > 0
    with session_scope(db) as session:
        assert session.scalar(text(drawn)) == first + 301 + 1
    with session_scope(db) as session:
        assert session.execute(text("SELECT id, last_renewal_at FROM accounts"
                                    " ORDER BY id")).all() == before
        assert session.scalar(text("SELECT count(*) FROM ledger_entries")) == 0
        assert session.scalar(text("SELECT count(*) FROM wallets WHERE balance <> 0")) == 0
    assert_verified(db)
