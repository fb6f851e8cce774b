"""/api/token-process: the seed 002 start/end API over the atomic start and the end event."""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header
from fastapi.responses import JSONResponse

from tokenledger.api.auth import PRODUCE, require
from tokenledger.api.billing import AUTH_ERRORS
from tokenledger.api.common import Api, invalid, publish_and_wait, respond
from tokenledger.api.schemas import EndIn, EndOut, Envelope, ErrorBody, Key, StartIn, StartOut
from tokenledger.catalog import current_catalog
from tokenledger.client import build_event, new_key
from tokenledger.db import unit_of_work
from tokenledger.reports import get_account
from tokenledger.tokenprocess.service import StartResult, run_start

router = APIRouter(prefix="/api/token-process", tags=["token process"], responses=AUTH_ERRORS)


@router.post("/start", response_model=Envelope[StartOut],
             dependencies=[Depends(require(*PRODUCE))],
             responses={409: {"model": ErrorBody, "description": "Key reused with other input"}},
             summary="Check the feature and the balance and hold the estimated cost (seed 002)")
async def start(body: StartIn, api: Api,
                idempotency_key: Annotated[Key | None, Header()] = None) -> JSONResponse:
    """One short transaction: lock the account, check plan and balance, place the hold.

    ``accessible`` carries the ``hold_id`` to pass to end; ``not-accessible`` carries the
    seed's message (`Insufficient tokens` or `Feature endpoint is not available in your
    package`). With an ``Idempotency-Key`` header a retried start returns the first answer.
    """
    if api.start_pool is not None:  # PostgreSQL: on the event loop, two round trips
        r = await api.start_pool.start(
            body.user_id, body.feature_endpoint_id, max_output_tokens=body.max_output_tokens,
            hold=body.hold, model=body.model, key=idempotency_key)
    else:
        r = await asyncio.get_running_loop().run_in_executor(api.starts, partial(
            run_start, api.settings, body.user_id, body.feature_endpoint_id,
            max_output_tokens=body.max_output_tokens, hold=body.hold, model=body.model,
            key=idempotency_key))
    return JSONResponse(start_body(body.user_id, r))


def start_body(user_id: str, r: StartResult) -> dict[str, Any]:
    """A start's 200 answer in the seed's shape (the route's and the fast path's)."""
    accessible = r.status == "accessible"
    data: dict[str, Any] = {"user_id": user_id, "token": r.token, "status": r.status,
                            "message": r.message,
                            "cost": r.held if accessible else r.required,
                            "hold_id": r.hold_id}
    if r.expires_at is not None:
        data["expires_at"] = r.expires_at.isoformat()
    # Built by hand: this is the hot path, and the shape is fixed.
    return {"success": True,
            "message": "Token process started" if accessible
            else (r.message or "Not accessible"),
            "data": data}


@router.post("/end", response_model=Envelope[EndOut], dependencies=[Depends(require(*PRODUCE))],
             responses={202: {"model": Envelope[EndOut],
                              "description": "Accepted; the outcome is not stored yet"},
                        409: {"model": ErrorBody,
                              "description": "Refused: the hold is unknown, settled, or the "
                                             "key was used for another payload"}},
             summary="Report the tokens used; the worker prices and settles it (seed 002)")
def end(body: EndIn, api: Api,
        prefer: Annotated[str | None, Header(max_length=200)] = None,
        idempotency_key: Annotated[Key | None, Header()] = None) -> JSONResponse:
    """Publishes a ``token_process_end`` event and waits (bounded) for the stored outcome:
    ``cost``, the new ``token`` balance and ``returnable`` / ``not-returnable``.
    ``Prefer: respond-async`` answers 202 with the key at once."""
    with unit_of_work(api.settings.database_url) as session:
        get_account(session, body.user_id)
        if body.feature_endpoint_id not in current_catalog(session).features:
            invalid("body", "feature_endpoint_id",
                    f"unknown feature {body.feature_endpoint_id!r}")
    event = build_event({
        "type": "token_process_end", "key": body.key or idempotency_key or new_key(),
        "user_id": body.user_id, "feature_endpoint_id": body.feature_endpoint_id,
        "input_tokens": body.input_token, "output_tokens": body.output_token,
        **({"model": body.model} if body.model else {}),
        **({"hold_id": body.hold_id} if body.hold_id else {}),
        **({"metadata": body.metadata} if body.metadata else {})})
    # The same event LedgerClient.token_process_end publishes; built here to know its hash.
    pending = {"user_id": body.user_id, "key": event.key, "status": "pending",
               "hold_id": body.hold_id}
    outcome = publish_and_wait(api, event, pending, prefer)
    if isinstance(outcome, JSONResponse):
        return outcome
    result = outcome.result
    if outcome.status == "applied":
        data = {"user_id": body.user_id, "key": event.key, "token": result.get("token"),
                "cost": result.get("cost"), "status": result.get("status", "returnable"),
                "message": result.get("message"), "hold_id": result.get("hold_id")}
        return respond(200, data, "Token process ended")
    if outcome.status == "dead_lettered" and outcome.reason == "account not found":
        return respond(404, {**pending, "status": outcome.status}, outcome.reason,
                       success=False)
    return respond(409, {**pending, "status": outcome.status, "message": outcome.reason},
                   outcome.reason or outcome.status, success=False)
