"""The two-phase token process as worked examples, on PostgreSQL (and a real worker).

Given an account, *start* sets credits aside (a hold) atomically; *end* prices the real
usage, settles the hold and charges the cost; holds never ended expire once.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from tests.support import apply, assert_verified, session_scope
from tests.support import run_cli as cli_in_process
from tokenledger import FeatureNotAccessible, LedgerClient, StartResult
from tokenledger.catalog.service import (
    REFRESH_SECONDS,
    current_catalog,
    default_catalog_text,
    load_catalog,
)
from tokenledger.db.uow import unit_of_work
from tokenledger.errors import AccountNotFound, CatalogError, IdempotencyConflict, ValidationFailed
from tokenledger.ledger.models import Account, EventOutcome, LedgerEntry, Wallet
from tokenledger.messages import StartRequest
from tokenledger.timeutil import utcnow
from tokenledger.tokenprocess.models import Hold
from tokenledger.tokenprocess.service import release_expired_holds, start

pytestmark = pytest.mark.services

NOT_IN_PACKAGE = "Feature endpoint is not available in your package"


# -- helpers ------------------------------------------------------------------------------


def open_(url, user="u1", plan=None, extra=0):
    event = {"type": "open_account", "key": f"open:{user}", "user_id": user}
    if plan:
        event["plan"] = plan
    apply(url, event)
    if extra:
        apply(url, {"type": "credit", "key": f"topup:{user}", "user_id": user,
                    "amount": extra})


def end(url, user, feature, input_tokens, output_tokens, key="end", now=None, **kw):
    event = {"type": "token_process_end", "key": key, "user_id": user,
             "feature_endpoint_id": feature, "input_tokens": input_tokens,
             "output_tokens": output_tokens, **kw}
    return apply(url, event, now=now).results[0]


def start_at(settings, user, feature, now, ttl=900, key=None, **kw) -> StartResult:
    own = settings.model_copy(update={"hold_ttl_seconds": ttl})
    with unit_of_work(own, now=now) as uow:
        return start(uow, StartRequest(user_id=user, feature_endpoint_id=feature, **kw), key)


def wallets(url, user="u1"):
    with session_scope(url) as s:
        acc = s.scalar(select(Account).where(Account.user_id == user))
        return {w.wallet_type: w.balance
                for w in s.scalars(select(Wallet).where(Wallet.account_id == acc.id))}


def total(url, user="u1"):
    return sum(wallets(url, user).values())


def hold(url, hold_id) -> Hold:
    with session_scope(url) as s:
        return s.get(Hold, hold_id)


def entries(url, user="u1"):
    """(type, wallet type, amount) of the user's entries, oldest first."""
    with session_scope(url) as s:
        rows = s.execute(
            select(LedgerEntry.type, Wallet.wallet_type, LedgerEntry.amount)
            .join(Wallet, Wallet.id == LedgerEntry.wallet_id)
            .join(Account, Account.id == LedgerEntry.account_id)
            .where(Account.user_id == user).order_by(LedgerEntry.id))
        return [tuple(r) for r in rows]


# -- start --------------------------------------------------------------------------------


def test_start_places_a_hold_that_takes_the_credits_off_the_available_balance(client, db):
    open_(db)  # Free: 5
    result = client.token_process_start("u1", "text_generation", hold=3)
    assert (result.status, result.token, result.held, result.message) == (
        "accessible", 2, 3, None)
    assert result.hold_id is not None and result.accessible
    assert client.balance("u1").balance == 2
    assert entries(db)[-1] == ("HOLD", "STANDARD", -3)
    row = hold(db, result.hold_id)
    assert (row.status, row.amount, row.feature) == ("open", 3, "text_generation")
    assert [(a["wallet_type"], a["amount"]) for a in row.allocations] == [("STANDARD", 3)]
    ttl = (row.expires_at - row.created_at).total_seconds()
    assert ttl == pytest.approx(client.settings.hold_ttl_seconds, abs=1)
    assert_verified(db)


def test_balance_50_and_20_concurrent_starts_of_5_give_exactly_10_holds(client, db):
    open_(db, "race", extra=45)
    assert client.balance("race").balance == 50
    barrier = threading.Barrier(20)

    def one(_: int) -> StartResult:
        barrier.wait()  # all 20 at once, each in its own transaction
        return client.token_process_start("race", "text_generation", hold=5)

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(one, range(20)))
    accessible = [r for r in results if r.accessible]
    refused = [r for r in results if not r.accessible]
    assert len(accessible) == 10 and len(refused) == 10
    assert {r.message for r in refused} == {"Insufficient tokens"}
    assert all(r.token == 0 and r.required == 5 for r in refused)
    assert len({r.hold_id for r in accessible}) == 10
    assert sorted(r.token for r in accessible) == list(range(0, 50, 5))
    assert client.balance("race").balance == 0
    with session_scope(db) as s:
        assert s.scalar(select(func.sum(Hold.amount)).where(Hold.status == "open")) == 50
    assert_verified(db)


def test_too_few_tokens_is_not_accessible_with_the_seed_message_and_changes_nothing(client,
                                                                                    db):
    open_(db)
    result = client.token_process_start("u1", "text_generation", hold=6)
    assert (result.status, result.message, result.token, result.required) == (
        "not-accessible", "Insufficient tokens", 5, 6)
    assert result.hold_id is None
    assert entries(db) == [("OPEN", "STANDARD", 5)]


def test_a_feature_outside_the_plan_gets_the_seed_message_an_unknown_one_is_refused(client,
                                                                                      db):
    open_(db)  # Free has no image_generation
    outside = client.token_process_start("u1", "image_generation")
    assert (outside.status, outside.message, outside.token) == (
        "not-accessible", NOT_IN_PACKAGE, 5)
    with pytest.raises(ValidationFailed, match="unknown feature 'teleport'"):
        client.token_process_start("u1", "teleport")
    assert client.balance("u1").balance == 5
    with session_scope(db) as s:
        assert s.scalar(select(func.count()).select_from(Hold)) == 0


def test_an_unknown_account_cannot_start(client, db):
    with pytest.raises(AccountNotFound):
        client.token_process_start("ghost", "text_generation")


def test_the_estimate_is_priced_from_max_output_tokens_or_defaults_to_the_minimum(client, db):
    open_(db, plan="Gift")  # 100, every feature
    # code_generation prices with gpt-4o: 4 × 1000 / 500 × 1.3 = 10.4 → 11
    priced = client.token_process_start("u1", "code_generation", max_output_tokens=1000)
    assert priced.held == 11
    assert hold(db, priced.hold_id).model == "gpt-4o"
    # a model of the caller's choosing: gpt-4o-mini 4 × 1000 / 4000 × 1.3 = 1.3 → 2
    cheap = client.token_process_start("u1", "code_generation", max_output_tokens=1000,
                                       model="gpt-4o-mini")
    assert cheap.held == 2
    minimum = client.token_process_start("u1", "code_generation")
    assert minimum.held == 2  # the feature's min_cost
    fixed = client.token_process_start("u1", "image_generation", max_output_tokens=5000)
    assert fixed.held == 10  # a fixed-cost feature holds its cost
    free = client.token_process_start("u1", "chat")
    assert (free.status, free.held) == ("accessible", 0)
    assert client.balance("u1").balance == 100 - 11 - 2 - 2 - 10
    assert_verified(db)


def test_a_start_with_a_key_is_idempotent(client, db):
    open_(db)
    first = client.token_process_start("u1", "text_generation", hold=2, key="s-1")
    again = client.token_process_start("u1", "text_generation", hold=2, key="s-1")
    assert again.hold_id == first.hold_id and again.held == 2
    assert client.balance("u1").balance == 3
    with pytest.raises(IdempotencyConflict):
        client.token_process_start("u1", "text_generation", hold=4, key="s-1")


# -- end ----------------------------------------------------------------------------------


def test_end_settles_for_less_than_the_hold_and_returns_the_rest(client, db):
    open_(db, extra=45)  # 5 STANDARD + 45 PREMIUM
    started = client.token_process_start("u1", "text_generation", hold=10)
    assert started.token == 40
    r = end(db, "u1", "text_generation", 100, 400, model="gemini-pro",
            hold_id=started.hold_id)
    assert r.status == "applied"
    assert {k: r.data[k] for k in ("user_id", "token", "cost", "status")} == {
        "user_id": "u1", "token": 47, "cost": 3, "status": "returnable"}
    assert (r.data["released"], r.data["charged"], r.data["hold"]) == (10, 3, "settled")
    assert client.balance("u1").balance == 47
    # the hold came from STANDARD (resets first) then PREMIUM; released back to each,
    # and the charge takes from the hold's wallets first
    assert entries(db)[2:] == [
        ("HOLD", "STANDARD", -5), ("HOLD", "PREMIUM", -5),
        ("HOLD_RELEASE", "STANDARD", 5), ("HOLD_RELEASE", "PREMIUM", 5),
        ("CHARGE", "STANDARD", -3)]
    row = hold(db, started.hold_id)
    assert (row.status, row.resolved_by) == ("settled", "end")
    assert row.resolved_at is not None
    assert_verified(db)


def test_the_seeds_worked_numbers_are_charged_with_the_exact_value_in_the_metadata(client,
                                                                                   db):
    open_(db)
    started = client.token_process_start("u1", "text_generation", max_output_tokens=400)
    assert started.held == 2  # 4 × 400 / 1000 × 1.2 = 1.92 → 2
    r = end(db, "u1", "text_generation", 100, 400, model="gemini-pro",
            hold_id=started.hold_id, metadata={"request": "r-1"})
    assert (r.data["cost"], r.data["exact_cost"], r.data["token"]) == (3, "2.04", 2)
    with session_scope(db) as s:
        (charge,) = s.scalars(select(LedgerEntry).where(LedgerEntry.type == "CHARGE")).all()
    assert charge.amount == -3 and charge.feature == "text_generation"
    assert charge.metadata_ == {"request": "r-1", "exact_cost": "2.04", "model": "gemini-pro",
                                "provider_cost": "0.0001625", "input_tokens": 100,
                                "output_tokens": 400, "hold_id": started.hold_id}


def test_end_without_a_hold_prices_and_charges_the_usage(client, db):
    open_(db)
    r = end(db, "u1", "text_generation", 100, 400)  # no model: the feature's default
    assert (r.status, r.data["cost"], r.data["token"], r.data["status"]) == (
        "applied", 3, 2, "returnable")
    assert r.data["model"] == "gemini-pro" and "hold_id" not in r.data
    assert entries(db)[-1] == ("CHARGE", "STANDARD", -3)
    # and the end's key can be refunded like any charge
    refund = apply(db, {"type": "refund", "key": "r", "user_id": "u1",
                        "original_key": "end"}).results[0]
    assert refund.data["refunded"] == 3 and total(db) == 5
    assert_verified(db)


def test_end_without_a_hold_for_a_feature_outside_the_plan_is_rejected(db):
    open_(db)
    r = end(db, "u1", "code_generation", 10, 10)
    assert (r.status, r.reason) == ("rejected", NOT_IN_PACKAGE)
    unknown = end(db, "u1", "teleport", 10, 10, key="end2")
    assert unknown.status == "rejected" and "unknown feature" in unknown.reason
    assert total(db) == 5


def test_end_with_no_tokens_releases_the_hold_and_charges_nothing(client, db):
    open_(db)
    started = client.token_process_start("u1", "text_generation", hold=4)
    r = end(db, "u1", "text_generation", 0, 0, hold_id=started.hold_id)
    assert (r.data["cost"], r.data["token"], r.data["hold"], r.data["released"]) == (
        0, 5, "released", 4)
    assert hold(db, started.hold_id).status == "released"
    assert [e[0] for e in entries(db)] == ["OPEN", "HOLD", "HOLD_RELEASE"]
    assert_verified(db)


def test_a_fixed_cost_feature_charges_its_cost_at_end(client, db):
    open_(db, plan="Gift")
    started = client.token_process_start("u1", "image_generation")
    assert (started.held, started.token) == (10, 90)
    r = end(db, "u1", "image_generation", 0, 1, hold_id=started.hold_id)
    assert (r.data["cost"], r.data["token"], r.data["status"]) == (10, 90, "returnable")


def test_cost_above_hold_and_balance_with_overdraft_goes_negative_and_is_recorded(client, db):
    open_(db)  # Free 5; text_generation allows overdraft
    started = client.token_process_start("u1", "text_generation", hold=2)
    # (1000 + 4 × 1500) / 1000 × 1.2 = 8.4 → 9
    r = end(db, "u1", "text_generation", 1000, 1500, hold_id=started.hold_id)
    assert {k: r.data[k] for k in ("cost", "charged", "shortfall", "unpaid", "status",
                                   "token", "overdraft")} == {
        "cost": 9, "charged": 9, "shortfall": 4, "unpaid": 0, "status": "not-returnable",
        "token": -4, "overdraft": True}
    assert "Insufficient tokens" in r.data["message"]
    assert wallets(db) == {"STANDARD": -4}
    with session_scope(db) as s:
        charge = s.scalar(select(LedgerEntry).where(LedgerEntry.type == "CHARGE"))
        assert charge.metadata_["shortfall"] == 4
    assert_verified(db)


def test_cost_above_hold_and_balance_without_overdraft_takes_what_is_there_and_records_the_rest(
        client, db):
    open_(db, plan="Gift")  # 100; code_generation does not allow overdraft
    started = client.token_process_start("u1", "code_generation", hold=5)
    # gpt-4o: 4 × 20000 / 500 × 1.3 = 208
    r = end(db, "u1", "code_generation", 0, 20000, hold_id=started.hold_id)
    assert {k: r.data[k] for k in ("cost", "charged", "shortfall", "unpaid", "status",
                                   "token", "overdraft")} == {
        "cost": 208, "charged": 100, "shortfall": 108, "unpaid": 108,
        "status": "not-returnable", "token": 0, "overdraft": False}
    assert wallets(db) == {"STANDARD": 0}
    assert_verified(db)


def test_duplicate_end_events_are_applied_once(client, db):
    open_(db, extra=20)
    started = client.token_process_start("u1", "text_generation", hold=5)
    event = {"type": "token_process_end", "key": "e1", "user_id": "u1",
             "feature_endpoint_id": "text_generation", "input_tokens": 100,
             "output_tokens": 400, "hold_id": started.hold_id}
    first, again_in_batch = apply(db, event, event).results
    later = apply(db, event).results[0]
    assert first.status == "applied"
    assert again_in_batch.status == later.status == "duplicate"
    assert later.data["outcome"] == "applied" and later.data["cost"] == 3
    assert total(db) == 22
    with session_scope(db) as s:
        assert s.scalar(select(func.count()).select_from(LedgerEntry)
                        .where(LedgerEntry.type == "CHARGE")) == 1
    assert_verified(db)


def test_a_second_end_for_a_settled_hold_is_rejected_and_charges_nothing(client, db):
    open_(db, extra=20)
    started = client.token_process_start("u1", "text_generation", hold=5)
    end(db, "u1", "text_generation", 100, 400, key="e1", hold_id=started.hold_id)
    second = end(db, "u1", "text_generation", 100, 400, key="e2", hold_id=started.hold_id)
    assert second.status == "rejected"
    assert second.reason == f"hold {started.hold_id} was already settled by 'e1'"
    assert total(db) == 22


def test_an_end_naming_someone_elses_or_an_unknown_hold_is_rejected(client, db):
    open_(db, "alice")
    open_(db, "bob")
    alices = client.token_process_start("alice", "text_generation", hold=3)
    stolen = end(db, "bob", "text_generation", 100, 400, hold_id=alices.hold_id)
    missing = end(db, "bob", "text_generation", 100, 400, key="e2", hold_id=999999)
    for r in (stolen, missing):
        assert r.status == "rejected" and "not found for this account" in r.reason
    other_feature = end(db, "alice", "chatgpt_message", 1, 1, key="e3",
                        hold_id=alices.hold_id)
    assert other_feature.status == "rejected" and "text_generation" in other_feature.reason
    assert (total(db, "alice"), total(db, "bob")) == (2, 5)
    assert hold(db, alices.hold_id).status == "open"


# -- expiry -------------------------------------------------------------------------------


def release_all(settings, now, limit=1000):
    with unit_of_work(settings, now=now) as uow:
        return release_expired_holds(uow, limit=limit)


def test_expired_holds_are_released_exactly_once(client, db):
    open_(db)
    t0 = utcnow()
    h = start_at(db, "u1", "text_generation", t0, ttl=60, hold=4)
    assert release_all(db, t0 + timedelta(seconds=59)).holds == 0  # not yet
    first = release_all(db, t0 + timedelta(seconds=61))
    second = release_all(db, t0 + timedelta(seconds=62))
    assert (first.holds, first.credits, second.holds) == (1, 4, 0)
    assert hold(db, h.hold_id).status == "expired"
    assert total(db) == 5
    assert [e[0] for e in entries(db)] == ["OPEN", "HOLD", "HOLD_RELEASE"]
    assert_verified(db)


def test_concurrent_expiry_runs_release_each_hold_once(db):
    t0 = utcnow() - timedelta(hours=1)
    users = [f"u{i}" for i in range(12)]
    for user in users:
        open_(db, user)
        start_at(db, user, "text_generation", t0, ttl=60, hold=2)
        start_at(db, user, "text_generation", t0, ttl=60, hold=3)
    barrier = threading.Barrier(4)

    def sweep(_: int) -> int:
        barrier.wait()
        released, now = 0, utcnow()
        while True:  # chunks of 5 accounts, as the task does
            report = release_all(db, now, limit=5)
            released += report.holds
            if report.accounts < 5:
                return released

    with ThreadPoolExecutor(4) as pool:
        counts = list(pool.map(sweep, range(4)))
    assert sum(counts) == 24
    assert all(total(db, u) == 5 for u in users)
    with session_scope(db) as s:
        assert s.scalar(select(func.count()).select_from(LedgerEntry)
                        .where(LedgerEntry.type == "HOLD_RELEASE")) == 24
        assert set(s.scalars(select(Hold.status))) == {"expired"}
    assert_verified(db)


def test_an_end_after_its_hold_expired_charges_without_the_hold(client, db):
    open_(db)
    t0 = utcnow()
    h = start_at(db, "u1", "text_generation", t0, ttl=60, hold=4)
    release_all(db, t0 + timedelta(seconds=61))
    r = end(db, "u1", "text_generation", 100, 400, hold_id=h.hold_id,
            now=t0 + timedelta(seconds=70))
    assert (r.status, r.data["cost"], r.data["hold"], r.data["token"]) == (
        "applied", 3, "expired", 2)
    assert total(db) == 2
    assert_verified(db)


def test_an_end_after_the_expiry_time_but_before_the_sweep_still_settles_the_hold(client, db):
    open_(db)
    t0 = utcnow()
    h = start_at(db, "u1", "text_generation", t0, ttl=60, hold=4)
    r = end(db, "u1", "text_generation", 100, 400, hold_id=h.hold_id,
            now=t0 + timedelta(seconds=90))
    assert (r.data["hold"], r.data["released"], r.data["token"]) == ("settled", 4, 2)
    assert release_all(db, t0 + timedelta(seconds=91)).holds == 0
    assert total(db) == 2


def test_a_hold_on_a_wallet_that_expires_meanwhile_never_refills_the_expired_wallet(db):
    t0 = utcnow()
    promo_expiry = t0 + timedelta(seconds=30)
    for user in ("settled", "expired"):
        open_(db, user, plan="Gift")  # STANDARD 100, renews in 30 days
        apply(db, {"type": "credit", "key": f"promo:{user}", "user_id": user, "amount": 10,
                   "wallet_type": "PROMO", "expires_at": promo_expiry.isoformat()})
    # the PROMO wallet expires first, so the hold is drawn from it
    a = start_at(db, "settled", "text_generation", t0, ttl=600, hold=8)
    b = start_at(db, "expired", "text_generation", t0, ttl=60, hold=8)
    assert wallets(db, "settled") == wallets(db, "expired") == {"STANDARD": 100, "PROMO": 2}

    # settled after the PROMO wallet expired: the 8 come back to STANDARD, cost 3 from it
    r = end(db, "settled", "text_generation", 100, 400, hold_id=a.hold_id,
            now=promo_expiry + timedelta(seconds=1))
    assert [(w["wallet_type"], w["amount"]) for w in r.data["wallets"]] == [("STANDARD", 3)]
    assert wallets(db, "settled") == {"STANDARD": 105, "PROMO": 2}
    assert r.data["token"] == 105  # the expired PROMO no longer counts

    # released by expiry after the PROMO wallet expired: back to STANDARD as well
    assert release_all(db, t0 + timedelta(seconds=61)).holds == 1
    assert hold(db, b.hold_id).status == "expired"
    assert wallets(db, "expired") == {"STANDARD": 108, "PROMO": 2}
    with session_scope(db) as s:
        releases = s.execute(select(Wallet.wallet_type, LedgerEntry.amount)
                             .join(Wallet, Wallet.id == LedgerEntry.wallet_id)
                             .where(LedgerEntry.type == "HOLD_RELEASE")).all()
    assert sorted(tuple(r) for r in releases) == [("STANDARD", 8), ("STANDARD", 8)]
    assert_verified(db)


def test_the_database_refuses_a_resolved_hold_without_a_resolution_time(client, db):
    from sqlalchemy.exc import IntegrityError

    open_(db)
    started = client.token_process_start("u1", "text_generation", hold=1)
    with pytest.raises(IntegrityError), session_scope(db) as s:
        s.get(Hold, started.hold_id).status = "settled"
        s.flush()


def test_start_and_expiry_announce_the_balance_change_after_commit(client, db):
    from tokenledger.notify import service as notify
    from tokenledger.notify.publisher import flush_published

    open_(db)
    assert flush_published()  # the opening's own notice is out before we listen
    seen = []
    unsubscribe = notify.subscribe(lambda n: seen.append((n.event, n.user_id, n.balance)),
                                   events=[notify.BALANCE_CHANGED])
    try:
        client.token_process_start("u1", "text_generation", hold=3)
        assert seen == [("balance_changed", "u1", 2)]
        client.token_process_start("u1", "text_generation", hold=9)  # refused: no change
        assert len(seen) == 1
        release_all(db, utcnow() + timedelta(days=1))
        assert flush_published()
        assert seen[-1] == ("balance_changed", "u1", 5)
    finally:
        unsubscribe()


# -- catalog load -------------------------------------------------------------------------


@pytest.fixture
def restore_catalog(db):
    yield
    with session_scope(db) as s:
        load_catalog(s, default_catalog_text(), "packaged default")
    time.sleep(REFRESH_SECONDS + 0.2)  # until running workers have re-read it too


def test_catalog_load_replaces_prices_and_a_bad_catalog_changes_nothing(db, restore_catalog):
    open_(db, extra=20)
    dearer = default_catalog_text().replace("profit_percent = 20", "profit_percent = 100")
    with session_scope(db) as s:
        before = current_catalog(s).version
        version = load_catalog(s, dearer, "dearer.toml")
    assert version > before
    # 1700 / 1000 × 2 = 3.4 → 4
    assert end(db, "u1", "text_generation", 100, 400).data["cost"] == 4
    broken = dearer.replace('default_model = "gemini-pro"', 'default_model = "gemini-ultra"')
    with pytest.raises(CatalogError, match="features.text_generation.default_model"), \
            session_scope(db) as s:
        load_catalog(s, broken, "broken.toml")
    with session_scope(db) as s:
        assert current_catalog(s).version == version


def test_catalog_load_refuses_to_drop_a_feature_that_open_holds_wait_on(client, db,
                                                                      restore_catalog):
    open_(db)
    client.token_process_start("u1", "text_generation", hold=1)
    without = default_catalog_text().replace("[features.text_generation]",
                                             "[features.text_generation_v2]")
    without = without.replace('"chatgpt_message", "text_generation"',
                              '"chatgpt_message", "text_generation_v2"')
    with pytest.raises(CatalogError, match="open token-process holds"), session_scope(db) as s:
        load_catalog(s, without, "without.toml")


def run_cli(settings, *args, check=True):
    done = cli_in_process(settings, *args)
    if check and done.exit_code != 0:
        raise AssertionError(f"exit {done.exit_code}: {done.stdout}\n{done.stderr}")
    return done


def test_the_cli_starts_ends_and_loads_catalogs(worker, client, settings, tmp_path,
                                                restore_catalog):
    client.open_account("cli")
    started = run_cli(settings, "start", "cli", "text_generation", "--hold", "3", "--json")
    data = json.loads(started.stdout)
    assert (data["status"], data["token"], data["held"]) == ("accessible", 2, 3)
    ended = run_cli(settings, "publish", "end", "cli", "text_generation",
                    "--input-tokens", "100", "--output-tokens", "400",
                    "--hold-id", str(data["hold_id"]), "--wait", "30")
    assert "applied" in ended.stdout and "'cost': 3" in ended.stdout
    assert client.balance("cli").balance == 2
    refused = run_cli(settings, "start", "cli", "image_generation", check=False)
    assert refused.exit_code == 11 and NOT_IN_PACKAGE in refused.stdout

    bad = tmp_path / "bad.toml"
    bad.write_text(default_catalog_text().replace("tokens_per_credit = 1000",
                                                  "tokens_per_credit = 0"))
    with session_scope(settings) as s:
        before = current_catalog(s).version
    refused = run_cli(settings, "catalog", "load", str(bad), check=False)
    assert refused.exit_code == 2
    assert "catalog refused" in refused.stderr and "tokens_per_credit" in refused.stderr
    good = tmp_path / "good.toml"
    good.write_text(default_catalog_text().replace("profit_percent = 20",
                                                   "profit_percent = 100"))
    loaded = run_cli(settings, "catalog", "load", str(good))
    assert "models: changed gemini-pro" in loaded.stdout
    with session_scope(settings) as s:
        assert current_catalog(s).version == before + 1
    # running workers price with the new catalog once they re-check it (within a second)
    time.sleep(REFRESH_SECONDS + 0.2)
    key = client.token_process_end("cli", "text_generation", 100, 400)
    assert client.result(key, timeout=30).data["cost"] == 4


# -- through the worker: SDK ----------------------------------------------------------------


def test_start_and_end_through_the_worker_in_the_seeds_shape(worker, client):
    client.open_account("w1")
    started = client.token_process_start("w1", "text_generation", max_output_tokens=400)
    key = client.token_process_end("w1", "text_generation", 100, 400, model="gemini-pro",
                                   hold_id=started.hold_id)
    again = client.token_process_end("w1", "text_generation", 100, 400, model="gemini-pro",
                                     hold_id=started.hold_id, key=key)  # redelivered
    assert again == key
    outcome = client.result(key, timeout=30)
    assert outcome.status == "applied"
    assert {k: outcome.data[k] for k in ("user_id", "token", "cost", "status")} == {
        "user_id": "w1", "token": 2, "cost": 3, "status": "returnable"}
    time.sleep(0.5)  # let the duplicate land too
    assert client.balance("w1").balance == 2
    assert_verified(client.settings)


def test_the_context_manager_charges_what_your_code_reports(worker, client):
    client.open_account("cm", plan="Gift")
    with client.token_process("cm", "text_generation", max_output_tokens=1000) as usage:
        assert usage.start.held == 5 and client.balance("cm").balance == 95
        usage.report(input_tokens=100, output_tokens=400, model="gemini-pro")
    outcome = usage.outcome(timeout=30)
    assert (outcome.data["cost"], outcome.data["token"]) == (3, 97)
    assert hold(client.settings, usage.hold_id).status == "settled"


def test_the_context_manager_releases_the_hold_and_reraises_when_your_code_fails(worker,
                                                                                client):
    client.open_account("boom", plan="Gift")
    with pytest.raises(RuntimeError, match="model timed out"), \
            client.token_process("boom", "text_generation", hold=20) as usage:
        usage.report(100, 400)
        raise RuntimeError("model timed out")
    outcome = usage.outcome(timeout=30)
    assert (outcome.data["cost"], outcome.data["token"], outcome.data["hold"]) == (
        0, 100, "released")
    assert client.balance("boom").balance == 100


def test_not_accessible_raises_and_your_code_never_runs(worker, client):
    client.open_account("poor")
    ran = []
    with pytest.raises(FeatureNotAccessible) as refused, \
            client.token_process("poor", "text_generation", hold=50):
        ran.append(True)
    assert not ran
    assert refused.value.result.message == "Insufficient tokens"
    assert refused.value.result.token == 5


def test_the_decorator_is_the_seeds_with_token_process(worker, client):
    client.open_account("deco", plan="Gift")
    calls = []

    @client.token_process(lambda data: data["user_id"], "text_generation")
    def generate_text(data):
        calls.append(data["prompt"])
        if data["prompt"] == "fail":
            raise ValueError("provider error")
        return {"text": "hi", "input_token": 100, "output_token": 400, "model": "gemini-pro"}

    result = generate_text({"user_id": "deco", "prompt": "Hello, world!"})
    assert result["text"] == "hi"
    with pytest.raises(ValueError, match="provider error"):
        generate_text({"user_id": "deco", "prompt": "fail"})
    assert calls == ["Hello, world!", "fail"]
    url = client.settings
    deadline = time.monotonic() + 30
    while True:  # the decorator publishes the ends; wait for the worker to apply both
        with session_scope(url) as s:
            costs = sorted(s.scalars(select(EventOutcome.result["cost"].as_integer())
                                     .where(EventOutcome.event_type == "token_process_end")))
        if len(costs) == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert costs == [0, 3]
    assert client.balance("deco").balance == 97
    with session_scope(url) as s:
        assert set(s.scalars(select(Hold.status))) == {"settled", "released"}
    assert_verified(url)


def test_the_worker_task_releases_expired_holds(worker, client, settings):
    client.open_account("late")
    short = LedgerClient(settings.model_copy(update={"hold_ttl_seconds": 1}))
    try:
        started = short.token_process_start("late", "text_generation", hold=4)
        assert client.balance("late").balance == 1
        time.sleep(1.2)
        short.producer.send("tokenledger.release_expired_holds")
        deadline = time.monotonic() + 30
        while hold(settings, started.hold_id).status == "open":
            assert time.monotonic() < deadline, "the hold was not released"
            time.sleep(0.1)
    finally:
        short.close()
    assert hold(settings, started.hold_id).status == "expired"
    assert client.balance("late").balance == 5
    assert_verified(settings)
