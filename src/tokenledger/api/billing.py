"""/api/billing: balance, wallets, transactions and can-afford (seeds 000, 001, 003)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query
from fastapi.responses import JSONResponse

from tokenledger.api.auth import PRODUCE, READ, require
from tokenledger.api.deps import AUTH_ERRORS, Api, invalid, publish_and_wait, respond, wallet_out
from tokenledger.api.schemas import (
    BalanceAtOut,
    BalanceOut,
    CanAffordOut,
    Code,
    CreatedWalletOut,
    CreateWalletIn,
    EntryType,
    Envelope,
    ErrorBody,
    TransactionOut,
    UserId,
    WalletsOut,
    When,
)
from tokenledger.db.uow import unit_of_work
from tokenledger.ledger.reports import balance as read_balance
from tokenledger.ledger.reports import (
    balance_as_of,
    balance_summary,
    can_afford,
    get_account,
    history,
)
from tokenledger.sdk.client import build_event, new_key
from tokenledger.timeutil import utcnow

router = APIRouter(prefix="/api/billing", tags=["billing"], responses=AUTH_ERRORS)
UserQuery = Annotated[UserId, Query(description="The caller's own user id")]


@router.get("/balance", response_model=Envelope[BalanceOut | BalanceAtOut],
            dependencies=[Depends(require(*READ))],
            summary="Total balance, wallets and whether a project can be created; "
                    "with `at`, as of that moment, from the ledger, holds shown apart")
def balance(user_id: UserQuery, api: Api,
            at: Annotated[When | None, Query(
                description="As of this moment (ISO 8601): every entry dated before it")]
            = None) -> dict[str, Any]:
    if at is not None:
        with unit_of_work(api.settings) as uow:
            b = balance_as_of(uow.session, user_id, at)
        return {"success": True, "data": {
            "userId": user_id, "plan": b.plan, "at": at.isoformat(), "balance": b.balance,
            "heldTokens": b.held,
            "wallets": [{**wallet_out(w), "heldTokens": w.held} for w in b.wallets]}}
    with unit_of_work(api.settings) as uow:
        session = uow.session
        summary = balance_summary(session, user_id, uow.catalog, utcnow())
    return {"success": True, "data": {
        "userId": user_id, "plan": summary["plan"], "balance": summary["balance"],
        "available": summary["available"], "canCreateProject": summary["can_create_project"],
        "requiredTokens": summary["required_tokens"],
        "wallets": [wallet_out(w) for w in summary["wallets"]]}}


@router.get("/wallets", response_model=Envelope[WalletsOut],
            dependencies=[Depends(require(*READ))], summary="Every wallet and the total")
def list_wallets(user_id: UserQuery, api: Api) -> dict[str, Any]:
    with unit_of_work(api.settings) as uow:
        session = uow.session
        summary = balance_summary(session, user_id, uow.catalog, utcnow())
    return {"success": True, "data": {
        "userId": user_id, "totalBalance": summary["balance"],
        "wallets": [wallet_out(w) for w in summary["wallets"]],
        "canCreateProject": summary["can_create_project"],
        "requiredTokens": summary["required_tokens"]}}


@router.post("/wallets", status_code=201, response_model=Envelope[CreatedWalletOut],
             dependencies=[Depends(require(*PRODUCE))],
             responses={202: {"model": Envelope[CreatedWalletOut],
                              "description": "Accepted; the outcome is not stored yet"},
                        409: {"model": ErrorBody, "description": "Refused (see message)"}},
             summary="Credit a wallet of a type, creating it (with its expiry) when needed")
def create_wallet(body: CreateWalletIn, api: Api,
                  prefer: Annotated[str | None, Header(max_length=200)] = None) -> Any:
    """Publishes a ``credit`` event and waits (bounded) for the worker to apply it."""
    now = utcnow()
    if body.expiresAt is not None and body.expiresAt <= now:
        invalid("body", "expiresAt", "must be in the future")
    if body.walletType == "STANDARD" and body.expiresAt is not None:
        invalid("body", "expiresAt", "the STANDARD wallet never expires; omit it")
    with unit_of_work(api.settings) as uow:
        session = uow.session
        get_account(session, body.user_id)
    event = build_event({
        "type": "credit", "key": body.key or new_key(), "user_id": body.user_id,
        "amount": body.initialTokens, "wallet_type": body.walletType,
        **({"expires_at": body.expiresAt} if body.expiresAt else {}),
        **({"reason": body.reason} if body.reason else {})})
    pending = {"key": event.key, "status": "pending", "wallet": None, "totalBalance": None}
    outcome = publish_and_wait(api, event, pending, prefer)
    if isinstance(outcome, JSONResponse):
        return outcome
    if outcome.status != "applied":
        return respond(409, {**pending, "status": outcome.status},
                       outcome.reason or outcome.status, success=False)
    wallet_id = outcome.result.get("wallet_id")
    with unit_of_work(api.settings) as uow:
        session = uow.session
        b = read_balance(session, body.user_id, uow.now)
    found = next((w for w in b.wallets if w.id == wallet_id), None)
    return JSONResponse({"success": True, "message": "Wallet credited", "data": {
        "key": event.key, "status": "applied",
        "wallet": wallet_out(found) if found else None, "totalBalance": b.balance}},
        status_code=201)


@router.get("/transactions", response_model=Envelope[list[TransactionOut]],
            dependencies=[Depends(require(*READ))],
            summary="Ledger entries, newest first, filtered and paginated")
def transactions(
    api: Api,
    user_id: UserQuery,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
    type: Annotated[EntryType | None, Query(description="Entry type")] = None,  # noqa: A002
    feature: Annotated[Code | None, Query()] = None,
    start: Annotated[When | None, Query(description="From (inclusive), ISO 8601")] = None,
    end: Annotated[When | None, Query(description="To (exclusive), ISO 8601")] = None,
) -> dict[str, Any]:
    if start is not None and end is not None and end <= start:
        invalid("query", "end", "must be after start")
    with unit_of_work(api.settings) as uow:
        session = uow.session
        rows = history(session, user_id, limit=limit, offset=offset, type_=type,
                       feature=feature, start=start, end=end)
    return {"success": True, "data": [{
        "id": r["id"], "userId": r["user_id"], "walletId": r["wallet_id"],
        "walletType": r["wallet_type"], "amount": r["amount"],
        "balanceBefore": r["balance_before"], "balanceAfter": r["balance_after"],
        "type": r["type"], "feature": r["feature"], "description": r["description"],
        "eventKey": r["event_key"], "reference": r["reference"], "metadata": r["metadata"],
        "createdAt": r["created_at"]} for r in rows]}


@router.get("/can-afford", response_model=Envelope[CanAffordOut],
            dependencies=[Depends(require(*READ))],
            summary="Whether the account can pay for a feature now, and the deficit if not")
def can_afford_route(user_id: UserQuery, feature: Annotated[Code, Query()],
                     api: Api) -> dict[str, Any]:
    with unit_of_work(api.settings) as uow:
        session = uow.session
        catalog = uow.catalog
        if feature not in catalog.features:
            invalid("query", "feature", f"unknown feature {feature!r}")
        r = can_afford(session, user_id, feature, catalog, utcnow())
    return {"success": True, "message": r["reason"], "data": {
        "userId": user_id, "feature": feature, "canAfford": r["can_afford"],
        "cost": r["cost"], "balance": r["balance"], "available": r["available"],
        "deficit": r["deficit"], "reason": r["reason"]}}
