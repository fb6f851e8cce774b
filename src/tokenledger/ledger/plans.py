"""Changing an account's plan (tier), and closing an account.

A plan change moves no credits, so it writes no ledger entry: the new plan's rules apply
from the account's next reset or renewal (its allocation, renewal mode and features; a
feature outside the new plan is refused from the next charge or start on). Closing moves
none either: it refuses charges and starts from then on, and keeps every row.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update

from tokenledger.db.uow import UnitOfWork
from tokenledger.errors import AccountNotFound, ValidationFailed
from tokenledger.ledger.models import Account

log = logging.getLogger("tokenledger.ledger")
accounts_t = Account.__table__


@dataclass(frozen=True, slots=True)
class PlanChange:
    """What :func:`change_plan` did: ``changed`` is false when the account had that plan."""

    user_id: str
    previous: str
    plan: str
    changed: bool


def change_plan(uow: UnitOfWork, user_id: str, plan: str) -> PlanChange:
    """Move ``user_id`` to ``plan`` (a plan of the current catalog), under the account's
    lock like every writer. Balances are untouched: a daily plan grants at the account's
    next local midnight, a 30-day plan once its last renewal (or the opening) is 30 days
    old. Safe to run twice. Raises ValidationFailed for an unknown plan, AccountNotFound.
    """
    try:
        uow.catalog.check_plan(plan)
    except ValueError as exc:
        raise ValidationFailed(f"plan: {exc}") from None
    a = accounts_t.c
    row = uow.session.execute(
        select(a.id, a.plan_code).where(a.user_id == user_id).with_for_update()).first()
    if row is None:
        raise AccountNotFound(user_id)
    if row.plan_code == plan:
        return PlanChange(user_id, plan, plan, False)
    uow.session.execute(update(accounts_t).where(a.id == row.id).values(plan_code=plan))
    log.info("plan changed", extra={"user_id": user_id, "previous_plan": row.plan_code,
                                    "plan": plan})
    return PlanChange(user_id, row.plan_code, plan, True)


def close_account(uow: UnitOfWork, user_id: str) -> datetime:
    """Close ``user_id`` under the account's lock: charges, starts and ends without a
    hold are refused by name from then on; credits, refunds and the ends of holds already
    placed still apply. Safe to run twice (answers the first closing's time). Raises
    AccountNotFound."""
    a = accounts_t.c
    row = uow.session.execute(
        select(a.id, a.closed_at).where(a.user_id == user_id).with_for_update()).first()
    if row is None:
        raise AccountNotFound(user_id)
    if row.closed_at is not None:
        return row.closed_at
    uow.session.execute(update(accounts_t).where(a.id == row.id).values(closed_at=uow.now))
    log.info("account closed", extra={"user_id": user_id})
    return uow.now
