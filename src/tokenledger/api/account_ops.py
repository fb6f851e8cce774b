"""/api/accounts/{user_id}: the seeds' renewal and balance-reset service methods
(``checkEligibility``, ``renewUser``, ``resetBalance``), thin over the SDK's, so the HTTP
client answers what ``LedgerClient`` answers."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from tokenledger.api.accounts import PathUser, _user
from tokenledger.api.auth import ADMIN, READ, require
from tokenledger.api.deps import AUTH_ERRORS, Api, respond
from tokenledger.api.schemas import Envelope, Key

router = APIRouter(prefix="/api/accounts", tags=["accounts and reports"], responses=AUTH_ERRORS)


class ResetIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    balance: int = Field(ge=0, le=10**15, description="The balance to set")
    reason: str = Field(min_length=1, max_length=500, description="Why (audited)")


@router.get("/{user_id:path}/eligibility", response_model=Envelope[dict[str, Any]],
            dependencies=[Depends(require(*READ))],
            summary="Whether the account's next grant is due, and when otherwise")
def eligibility(api: Api, user_id: PathUser) -> JSONResponse:
    e = api.client.eligibility(_user(user_id))
    return respond(200, e.as_dict(), e.reason)


@router.post("/{user_id:path}/renew", response_model=Envelope[dict[str, Any]],
             dependencies=[Depends(require(*ADMIN))],
             summary="Renew the account now if it is due (once per period)")
def renew(api: Api, user_id: PathUser) -> JSONResponse:
    r = api.client.renew(_user(user_id))
    data = {"success": r.success, "user_id": r.user_id, "tokens_added": r.tokens_added,
            "new_balance": r.new_balance, "error": r.error, "run_id": r.run_id,
            "next_renewal_date": r.next_renewal_date.isoformat()
            if r.next_renewal_date else None}
    return respond(200, data, "Renewed" if r.success else r.error)


@router.post("/{user_id:path}/reset-balance", response_model=Envelope[dict[str, Any]],
             dependencies=[Depends(require(*ADMIN))],
             summary="Set the balance by an audited ADJUSTMENT (Idempotency-Key header)")
def reset_balance(api: Api, user_id: PathUser, body: ResetIn,
                  idempotency_key: Annotated[Key | None, Header()] = None) -> JSONResponse:
    r = api.client.reset_balance(_user(user_id), body.balance, body.reason,
                                                 key=idempotency_key)
    return respond(200, r.as_dict(), "Balance reset")
