"""/api/accounts: open an account; its statistics and monthly report (seeds 003, 004);
erase it, set its low-balance threshold (admin)."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query
from fastapi.responses import JSONResponse

from tokenledger.api.auth import ADMIN, PRODUCE, READ, require
from tokenledger.api.deps import AUTH_ERRORS, Api, invalid, respond, wallet_out
from tokenledger.api.schemas import (
    AccountOut,
    Envelope,
    ErrorBody,
    MonthlyReportOut,
    OpenAccountIn,
    StatisticsOut,
    ThresholdIn,
    When,
)
from tokenledger.apikeys.service import KeyInfo
from tokenledger.db.uow import unit_of_work
from tokenledger.errors import AccountNotFound
from tokenledger.ledger.reports import balance, get_account, monthly_report, statistics
from tokenledger.messages import clean_text
from tokenledger.notify.service import set_threshold
from tokenledger.retention.erasure import erase
from tokenledger.timeutil import utcnow

router = APIRouter(prefix="/api/accounts", tags=["accounts and reports"], responses=AUTH_ERRORS)
PathUser = Annotated[str, Path(min_length=1, max_length=128, description="The user id")]
CreditValue = Annotated[Decimal | None, Query(
    ge=0, le=10**6, max_digits=20, decimal_places=10,
    description="Value of one credit in the catalog's currency, for the margin in currency")]


def _user(user_id: str) -> str:
    try:
        return clean_text(user_id)
    except ValueError as exc:
        invalid("path", "user_id", str(exc))


def _account(api: Api, user_id: str, created: bool) -> dict[str, Any]:
    with unit_of_work(api.settings) as uow:
        session = uow.session
        b = balance(session, user_id, uow.now)
    return {"userId": user_id, "plan": b.plan, "timezone": b.timezone, "created": created,
            "balance": b.balance, "wallets": [wallet_out(w) for w in b.wallets]}


@router.post("", status_code=201, response_model=Envelope[AccountOut],
             dependencies=[Depends(require(*PRODUCE))],
             responses={200: {"model": Envelope[AccountOut],
                              "description": "The account already existed (same plan)"},
                        409: {"model": ErrorBody,
                              "description": "The account exists with another plan"}},
             summary="Open an account and grant its plan's opening tokens (idempotent)")
def open_account(body: OpenAccountIn, api: Api) -> JSONResponse:
    with unit_of_work(api.settings) as uow:
        session = uow.session
        catalog = uow.catalog
        if body.plan is not None:
            try:
                catalog.check_plan(body.plan)
            except ValueError as exc:
                invalid("body", "plan", str(exc))
        try:
            existing = get_account(session, body.user_id)
        except AccountNotFound:
            existing = None
    if existing is not None:
        if body.plan is not None and body.plan != existing.plan_code:
            return respond(409, _account(api, body.user_id, False),
                           f"Account exists with plan {existing.plan_code}", success=False)
        return respond(200, _account(api, body.user_id, False), "Account already exists")
    api.client.open_account(body.user_id, plan=body.plan, timezone=body.timezone)
    return respond(201, _account(api, body.user_id, True), "Account opened")


@router.get("/{user_id:path}/statistics", response_model=Envelope[StatisticsOut],
            dependencies=[Depends(require(*READ))],
            summary="Spent, earned, net change, operations, per feature and model, margin")
def account_statistics(
    api: Api, user_id: PathUser,
    start: Annotated[When | None, Query(description="From (inclusive), ISO 8601")] = None,
    end: Annotated[When | None, Query(description="To (exclusive), ISO 8601")] = None,
    credit_value: CreditValue = None,
) -> Any:
    user_id = _user(user_id)
    if start is not None and end is not None and end <= start:
        invalid("query", "end", "must be after start")
    with unit_of_work(api.settings) as uow:
        session = uow.session
        data = statistics(session, user_id, start, end, catalog=uow.catalog,
                          credit_value=credit_value)
    return {"success": True, "data": data}


@router.get("/{user_id:path}/reports/monthly", response_model=Envelope[MonthlyReportOut],
            dependencies=[Depends(require(*READ))],
            summary="A month in the account's timezone: balances, summary, breakdowns")
def account_monthly_report(
    api: Api, user_id: PathUser,
    month: Annotated[str | None, Query(pattern=r"^\d{4}-(0[1-9]|1[0-2])$",
                                       description="YYYY-MM (default: the current month)")]
    = None,
    credit_value: CreditValue = None,
) -> Any:
    user_id = _user(user_id)
    if month is not None and not 1970 <= int(month[:4]) <= 9998:
        invalid("query", "month", "year must be between 1970 and 9998")
    with unit_of_work(api.settings) as uow:
        session = uow.session
        data = monthly_report(session, user_id, month, utcnow(),
                              catalog=uow.catalog, credit_value=credit_value)
    return {"success": True, "data": data}


@router.post("/{user_id:path}/erase", response_model=Envelope[dict[str, Any]],
             summary="Erase a person: a pseudonym for the user id everywhere, free text "
                     "dropped, every amount kept (idempotent)")
def erase_account(api: Api, user_id: PathUser,
                  key: Annotated[KeyInfo, Depends(require(*ADMIN))]) -> Any:
    user_id = _user(user_id)
    by = f"api-key:{key.prefix}" + (f" ({key.name})" if key.name else "")
    with unit_of_work(api.settings) as uow:
        erased = erase(uow, user_id, by)
    return respond(200, erased.as_dict(),
                   "Already erased" if erased.already_erased else "Account erased")


@router.put("/{user_id:path}/low-balance-threshold", response_model=Envelope[dict[str, Any]],
            dependencies=[Depends(require(*ADMIN))],
            summary="The account's own low-balance threshold (null: its plan's)")
def put_threshold(api: Api, user_id: PathUser, body: ThresholdIn) -> Any:
    user_id = _user(user_id)
    with unit_of_work(api.settings) as uow:
        threshold = set_threshold(uow.session, user_id, body.threshold, uow.now)
    return {"success": True, "data": {"userId": user_id, "threshold": threshold}}
