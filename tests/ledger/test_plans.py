"""Changing an account's plan, as worked examples on PostgreSQL."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from tests.support import apply, assert_verified, session_scope
from tokenledger.db.uow import unit_of_work
from tokenledger.errors import AccountNotFound, ValidationFailed
from tokenledger.ledger.models import Account, LedgerEntry
from tokenledger.ledger.plans import change_plan
from tokenledger.renewals.service import eligibility

pytestmark = pytest.mark.services


def open_free(settings, user: str = "u1") -> None:
    apply(settings, {"type": "open_account", "key": f"open:{user}", "user_id": user})


def test_a_free_account_moved_to_business_may_generate_images_and_renews_monthly(db):
    open_free(db)
    before = apply(db, {"type": "charge", "key": "img-1", "user_id": "u1",
                        "feature": "image_generation"}).results[0]
    assert (before.status, before.reason) == (
        "rejected", "Feature endpoint is not available in your package")

    with unit_of_work(db) as uow:
        change = change_plan(uow, "u1", "Business")
    assert (change.previous, change.plan, change.changed) == ("Free", "Business", True)

    with unit_of_work(db) as uow:
        due = eligibility(uow.session, "u1", uow.catalog, uow.now)
    assert (due.plan, due.period, due.allocation) == ("Business", "30d", 10000)
    # No credits move: the 5 opening tokens are not enough for an image until a credit.
    after = apply(db, {"type": "charge", "key": "img-2", "user_id": "u1",
                       "feature": "image_generation"}).results[0]
    assert after.status == "declined" and "required 10, available 5" in after.reason
    with session_scope(db) as s:
        assert s.scalar(select(Account.plan_code).where(Account.user_id == "u1")) == "Business"
        assert [e.type for e in s.scalars(select(LedgerEntry))] == ["OPEN"]
    assert_verified(db)


def test_changing_to_the_same_plan_twice_changes_nothing_the_second_time(db):
    open_free(db)
    with unit_of_work(db) as uow:
        assert change_plan(uow, "u1", "Gift").changed
    with unit_of_work(db) as uow:
        again = change_plan(uow, "u1", "Gift")
    assert (again.previous, again.plan, again.changed) == ("Gift", "Gift", False)


def test_an_unknown_plan_or_account_is_refused_and_nothing_changes(db):
    open_free(db)
    with pytest.raises(ValidationFailed, match="plan: unknown plan 'Platinum'"), \
            unit_of_work(db) as uow:
        change_plan(uow, "u1", "Platinum")
    with pytest.raises(AccountNotFound), unit_of_work(db) as uow:
        change_plan(uow, "ghost", "Gift")
    with session_scope(db) as s:
        assert s.scalar(select(Account.plan_code).where(Account.user_id == "u1")) == "Free"
