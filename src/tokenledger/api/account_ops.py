"""/api/accounts/{user_id}: the seeds' renewal and balance-reset service methods
(``checkEligibility``, ``renewUser``, ``resetBalance``), thin over the SDK's, so the HTTP
client answers what ``LedgerClient`` answers."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from tokenledger.api.accounts import PathUser, _user
from tokenledger.api.auth import ADMIN, READ, require
from tokenledger.api.deps import AUTH_ERRORS, Api, camel_keys, respond
from tokenledger.api.schemas import EligibilityOut, Envelope, Key, RenewalOut, ResetOut

router = APIRouter(prefix="/api/accounts", tags=["accounts and reports"], responses=AUTH_ERRORS)


class ResetIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    balance: int = Field(ge=0, le=10**15, description="The balance to set")
    reason: str = Field(min_length=1, max_length=500, description="Why (audited)")


@router.get("/{user_id:path}/eligibility", response_model=Envelope[EligibilityOut],
            dependencies=[Depends(require(*READ))],
            summary="Whether the account's next grant is due, and when otherwise")
def eligibility(api: Api, user_id: PathUser) -> JSONResponse:
    e = api.client.eligibility(_user(user_id))
    return respond(200, camel_keys(e.as_dict()), e.reason)


@router.post("/{user_id:path}/renew", response_model=Envelope[RenewalOut],
             dependencies=[Depends(require(*ADMIN))],
             summary="Renew the account now if it is due (once per period)")
def renew(api: Api, user_id: PathUser) -> JSONResponse:
    r = api.client.renew(_user(user_id))
    data = RenewalOut.model_validate(r, from_attributes=True).model_dump(mode="json",
                                                                         by_alias=True)
    return respond(200, data, "Renewed" if r.success else r.error)


@router.post("/{user_id:path}/reset-balance", response_model=Envelope[ResetOut],
             dependencies=[Depends(require(*ADMIN))],
             summary="Set the balance by an audited ADJUSTMENT (Idempotency-Key header)")
def reset_balance(api: Api, user_id: PathUser, body: ResetIn,
                  idempotency_key: Annotated[Key | None, Header()] = None) -> JSONResponse:
    r = api.client.reset_balance(_user(user_id), body.balance, body.reason,
                                                 key=idempotency_key)
    return respond(200, camel_keys(r.as_dict()), "Balance reset")
