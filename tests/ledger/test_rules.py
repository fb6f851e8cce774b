"""The ledger rules as worked examples, applied through the domain on PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from tests.support import apply, assert_verified, session_scope
from tokenledger.ledger.models import EventConflict, LedgerEntry, Wallet
from tokenledger.queue.models import DeadLetter
from tokenledger.timeutil import utcnow

pytestmark = pytest.mark.services


def open_(url, user="u1", plan=None, **kw):
    event = {"type": "open_account", "key": f"open:{user}", "user_id": user, **kw}
    if plan:
        event["plan"] = plan
    return apply(url, event).results[0]


def wallets(url, user="u1"):
    with session_scope(url) as s:
        from tokenledger.ledger.models import Account
        acc = s.scalar(select(Account).where(Account.user_id == user))
        return {w.wallet_type: w.balance for w in
                s.scalars(select(Wallet).where(Wallet.account_id == acc.id))}


def test_opening_an_account_grants_the_plans_opening_tokens(db):
    result = open_(db)
    assert result.status == "applied"
    assert result.data["balance"] == 5
    assert open_(db, "gift", plan="Gift").data["balance"] == 100
    assert_verified(db)


def test_opening_twice_with_another_key_is_rejected_and_grants_nothing(db):
    open_(db)
    again = apply(db, {"type": "open_account", "key": "other", "user_id": "u1"}).results[0]
    assert (again.status, again.reason) == ("rejected", "account already exists")
    assert wallets(db) == {"STANDARD": 5}


def test_unknown_plan_is_rejected(db):
    assert open_(db, plan="Platinum").status == "rejected"


def test_charge_by_feature_takes_its_catalog_cost(db):
    open_(db, plan="Gift")
    r = apply(db, {"type": "charge", "key": "c1", "user_id": "u1",
                   "feature": "image_generation"}).results[0]
    assert (r.status, r.data["charged"], r.data["balance"]) == ("applied", 10, 90)


def test_given_5_tokens_when_two_charges_of_3_then_one_applies_and_one_is_declined(db):
    open_(db)
    first, second = apply(db, {"type": "charge", "key": "a", "user_id": "u1", "amount": 3},
                          {"type": "charge", "key": "b", "user_id": "u1", "amount": 3}).results
    assert first.status == "applied"
    assert second.status == "declined"
    assert second.reason == "insufficient tokens (required 3, available 2)"
    assert wallets(db) == {"STANDARD": 2}
    assert_verified(db)


def test_overdraft_lets_the_standard_wallet_go_negative(db):
    open_(db)
    r = apply(db, {"type": "charge", "key": "a", "user_id": "u1", "amount": 8,
                   "allow_overdraft": True}).results[0]
    assert r.status == "applied" and r.data["balance"] == -3
    assert wallets(db) == {"STANDARD": -3}
    assert_verified(db)


def test_a_charge_spans_wallets_soonest_expiry_first_with_one_entry_per_wallet(db):
    open_(db, plan="Gift")  # STANDARD 100, renews in 30 days
    soon = (utcnow() + timedelta(days=2)).isoformat()
    later = (utcnow() + timedelta(days=10)).isoformat()
    apply(db, {"type": "credit", "key": "p1", "user_id": "u1", "amount": 7,
               "wallet_type": "PROMO", "expires_at": later},
          {"type": "credit", "key": "p2", "user_id": "u1", "amount": 4,
           "wallet_type": "PROMO", "expires_at": soon})
    r = apply(db, {"type": "charge", "key": "c", "user_id": "u1", "amount": 15}).results[0]
    taken = [(w["wallet_type"], w["amount"]) for w in r.data["wallets"]]
    assert taken == [("PROMO", 4), ("PROMO", 7), ("STANDARD", 4)]
    with session_scope(db) as s:
        assert s.query(LedgerEntry).filter_by(event_key="c").count() == 3
    assert_verified(db)


def test_a_daily_standard_wallet_is_drawn_before_a_premium_one_that_never_expires(db):
    open_(db)  # Free: STANDARD 5 resets at midnight, so spend it first
    apply(db, {"type": "credit", "key": "p", "user_id": "u1", "amount": 10})
    r = apply(db, {"type": "charge", "key": "c", "user_id": "u1", "amount": 6}).results[0]
    assert [(w["wallet_type"], w["amount"]) for w in r.data["wallets"]] == [
        ("STANDARD", 5), ("PREMIUM", 1)]


def test_preferred_wallet_type_is_drawn_first(db):
    open_(db)
    apply(db, {"type": "credit", "key": "p", "user_id": "u1", "amount": 10})
    r = apply(db, {"type": "charge", "key": "c", "user_id": "u1", "amount": 6,
                   "preferred_wallet_type": "PREMIUM"}).results[0]
    assert [(w["wallet_type"], w["amount"]) for w in r.data["wallets"]] == [("PREMIUM", 6)]


def test_expired_wallets_are_not_spendable(db):
    open_(db)
    past = utcnow() + timedelta(seconds=1)
    apply(db, {"type": "credit", "key": "p", "user_id": "u1", "amount": 10,
               "wallet_type": "PROMO", "expires_at": past.isoformat()})
    r = apply(db, {"type": "charge", "key": "c", "user_id": "u1", "amount": 6},
              now=past + timedelta(seconds=1)).results[0]
    assert r.status == "declined" and r.data["available"] == 5


def test_credit_with_an_expiry_in_the_past_is_rejected(db):
    open_(db)
    r = apply(db, {"type": "credit", "key": "p", "user_id": "u1", "amount": 10,
                   "expires_at": "2001-01-01T00:00:00Z"}).results[0]
    assert r.status == "rejected" and "past" in r.reason


def test_refund_returns_credits_to_the_wallets_they_came_from(db):
    open_(db)
    apply(db, {"type": "credit", "key": "p", "user_id": "u1", "amount": 10})
    apply(db, {"type": "charge", "key": "c", "user_id": "u1", "amount": 8})
    assert wallets(db) == {"STANDARD": 0, "PREMIUM": 7}
    r = apply(db, {"type": "refund", "key": "r", "user_id": "u1", "original_key": "c",
                   "reason": "operation_failed"}).results[0]
    assert r.status == "applied" and r.data["refunded"] == 8
    assert wallets(db) == {"STANDARD": 5, "PREMIUM": 10}
    assert_verified(db)


def test_refunds_never_exceed_what_was_charged_minus_earlier_refunds(db):
    open_(db)
    apply(db, {"type": "charge", "key": "c", "user_id": "u1", "amount": 4})
    part = apply(db, {"type": "refund", "key": "r1", "user_id": "u1", "original_key": "c",
                      "amount": 3}).results[0]
    too_much = apply(db, {"type": "refund", "key": "r2", "user_id": "u1",
                          "original_key": "c", "amount": 2}).results[0]
    rest = apply(db, {"type": "refund", "key": "r3", "user_id": "u1",
                      "original_key": "c"}).results[0]
    done = apply(db, {"type": "refund", "key": "r4", "user_id": "u1",
                      "original_key": "c"}).results[0]
    assert part.status == "applied"
    assert too_much.status == "rejected" and "refundable 1" in too_much.reason
    assert rest.status == "applied" and rest.data["refunded"] == 1
    assert done.status == "rejected" and "fully refunded" in done.reason
    assert wallets(db) == {"STANDARD": 5}


def test_refund_to_an_expired_wallet_goes_to_standard(db):
    open_(db)
    soon = utcnow() + timedelta(seconds=5)
    apply(db, {"type": "credit", "key": "p", "user_id": "u1", "amount": 10,
               "wallet_type": "PROMO", "expires_at": soon.isoformat()})
    apply(db, {"type": "charge", "key": "c", "user_id": "u1", "amount": 4,
               "preferred_wallet_type": "PROMO"})
    r = apply(db, {"type": "refund", "key": "r", "user_id": "u1", "original_key": "c"},
              now=soon + timedelta(seconds=1)).results[0]
    assert [(w["wallet_type"], w["amount"]) for w in r.data["wallets"]] == [("STANDARD", 4)]
    assert_verified(db)


def test_refund_of_a_declined_charge_is_rejected(db):
    open_(db)
    apply(db, {"type": "charge", "key": "c", "user_id": "u1", "amount": 50})
    r = apply(db, {"type": "refund", "key": "r", "user_id": "u1",
                   "original_key": "c"}).results[0]
    assert r.status == "rejected" and "declined" in r.reason


def test_refund_of_another_users_charge_is_rejected(db):
    open_(db, "u1")
    open_(db, "u2")
    apply(db, {"type": "charge", "key": "c", "user_id": "u1", "amount": 2})
    r = apply(db, {"type": "refund", "key": "r", "user_id": "u2",
                   "original_key": "c"}).results[0]
    assert r.status == "rejected" and "another account" in r.reason


def test_refund_before_its_charge_is_applied_is_deferred_not_rejected(db):
    open_(db)
    result = apply(db, {"type": "refund", "key": "r", "user_id": "u1", "original_key": "c"})
    assert result.results[0].status == "deferred"
    assert [e.key for e in result.deferred] == ["r"]


def test_a_duplicate_returns_the_stored_outcome_and_changes_nothing(db):
    open_(db)
    charge = {"type": "charge", "key": "c", "user_id": "u1", "amount": 2}
    first = apply(db, charge).results[0]
    again = apply(db, charge, charge).results
    assert [r.status for r in again] == ["duplicate", "duplicate"]
    assert again[0].data["outcome"] == "applied" and again[0].data["charged"] == 2
    assert first.status == "applied" and wallets(db) == {"STANDARD": 3}
    assert_verified(db)


def test_a_declined_event_redelivered_stays_declined(db):
    open_(db)
    big = {"type": "charge", "key": "c", "user_id": "u1", "amount": 9}
    assert apply(db, big).results[0].status == "declined"
    apply(db, {"type": "credit", "key": "p", "user_id": "u1", "amount": 10})
    again = apply(db, big).results[0]
    assert again.status == "duplicate" and again.data["outcome"] == "declined"


def test_same_key_with_another_payload_is_a_recorded_conflict_never_applied(db):
    open_(db)
    apply(db, {"type": "charge", "key": "c", "user_id": "u1", "amount": 1})
    r = apply(db, {"type": "charge", "key": "c", "user_id": "u1", "amount": 4}).results[0]
    assert r.status == "conflict"
    assert wallets(db) == {"STANDARD": 4}
    with session_scope(db) as s:
        (conflict,) = s.scalars(select(EventConflict)).all()
        assert conflict.key == "c" and conflict.payload["amount"] == 4


def test_events_for_unknown_accounts_are_dead_lettered(db):
    r = apply(db, {"type": "charge", "key": "c", "user_id": "ghost", "amount": 1})
    assert r.results[0].status == "dead_lettered" and r.dead_lettered == 1
    with session_scope(db) as s:
        (dead,) = s.scalars(select(DeadLetter)).all()
        assert dead.reason == "account not found" and dead.key == "c"


def test_a_free_feature_costs_nothing_and_writes_no_entry(db):
    open_(db)
    r = apply(db, {"type": "charge", "key": "c", "user_id": "u1", "feature": "chat"})
    assert r.results[0].data["charged"] == 0
    with session_scope(db) as s:
        assert s.query(LedgerEntry).filter_by(event_key="c").count() == 0


def test_a_feature_outside_the_plan_is_rejected_with_the_seed_message(db):
    open_(db)  # Free has no image_generation
    r = apply(db, {"type": "charge", "key": "c", "user_id": "u1",
                   "feature": "image_generation"}).results[0]
    assert (r.status, r.reason) == ("rejected",
                                    "Feature endpoint is not available in your package")
    unknown = apply(db, {"type": "charge", "key": "d", "user_id": "u1",
                         "feature": "teleport"}).results[0]
    assert unknown.status == "rejected" and "unknown feature" in unknown.reason


def test_the_database_refuses_entries_that_break_the_arithmetic(db):
    from sqlalchemy.exc import IntegrityError
    open_(db)
    with pytest.raises(IntegrityError), session_scope(db) as s:
        s.add(LedgerEntry(account_id=1, wallet_id=1, amount=5, balance_before=0,
                          balance_after=4, type="CREDIT"))
        s.flush()


def test_the_database_refuses_an_entry_on_a_wallet_of_another_account(db):
    """Checked once per statement (migration 0007): one bad row fails the whole insert."""
    from sqlalchemy import text
    from sqlalchemy.exc import IntegrityError
    open_(db, "a")
    open_(db, "b")
    with session_scope(db) as s:
        (a, wa), (b, wb) = s.execute(text(
            "SELECT a.id, w.id FROM accounts a JOIN wallets w ON w.account_id = a.id"
            " ORDER BY a.id")).all()
    insert = ("INSERT INTO ledger_entries (account_id, wallet_id, amount, balance_before,"
              " balance_after, type, event_key) VALUES (:acc, :good, 1, 0, 1, 'CREDIT', 'ok')")
    bad_row = ", (:acc, :bad, 1, 0, 1, 'CREDIT', 'bad')"
    with pytest.raises(IntegrityError, match=f"wallet {wb}, which is not a wallet of account"
                       f" {a}") as caught, session_scope(db) as s:
        s.execute(text(insert + bad_row), {"acc": a, "good": wa, "bad": wb})
    assert caught.value.orig.sqlstate == "23503"  # foreign_key_violation, as before
    with pytest.raises(IntegrityError), session_scope(db) as s:
        s.execute(text(insert), {"acc": a, "good": 999_999})  # a wallet that does not exist
    with session_scope(db) as s:
        assert s.query(LedgerEntry).filter(LedgerEntry.event_key.in_(["ok", "bad"])).count() == 0
    # Without the foreign key's lock, the wallets must not move or vanish under an insert.
    for statement in ("DELETE FROM wallets WHERE id = :w",
                      "UPDATE wallets SET account_id = :other WHERE id = :w"):
        with pytest.raises(IntegrityError, match="wallet"), session_scope(db) as s:
            s.execute(text(statement), {"w": wa, "other": b})
    with session_scope(db) as s:  # other updates go on as before
        s.execute(text("UPDATE wallets SET is_active = is_active WHERE id = :w"), {"w": wa})
    assert_verified(db)
