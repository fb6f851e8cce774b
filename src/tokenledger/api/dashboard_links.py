"""/api/dashboard/links: mint a user's short-lived, read-only dashboard link."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from tokenledger.api.auth import READ, require
from tokenledger.api.deps import AUTH_ERRORS, Api, respond
from tokenledger.api.schemas import DashboardLinkIn, DashboardLinkOut, Envelope, ErrorBody
from tokenledger.dashboard.links import DashboardDisabled, mint
from tokenledger.db.uow import unit_of_work
from tokenledger.ledger.reports import get_account

router = APIRouter(prefix="/api/dashboard", tags=["dashboard"], responses=AUTH_ERRORS)


@router.post("/links", status_code=201, response_model=Envelope[DashboardLinkOut],
             dependencies=[Depends(require(*READ))],
             responses={503: {"model": ErrorBody,
                              "description": "TOKENLEDGER_DASHBOARD_SECRET is not set"}},
             summary="A link to one account's read-only dashboard, valid for ttl_seconds "
                     "(default 900), and the badge snippet")
def create_link(body: DashboardLinkIn, request: Request, api: Api) -> Any:
    """Whoever holds the link may read that account's pages until it expires, and
    nothing else; hand it to the signed-in user (a redirect, an iframe, the badge)."""
    with unit_of_work(api.settings) as uow:
        get_account(uow.session, body.user_id)
        now = uow.now
    try:
        link = mint(api.settings, body.user_id, now, body.ttl_seconds,
                    base_url=api.settings.dashboard_url or str(request.base_url))
    except DashboardDisabled as exc:
        return respond(503, None, str(exc), success=False)
    return JSONResponse({"success": True, "message": None, "data": link.as_dict()},
                        status_code=201)
