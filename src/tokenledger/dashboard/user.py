"""The end user's pages, reached through a signed link (``/dashboard/u/<token>``): balance,
wallets and holds, what they can use now, the next reset or renewal, the history; the
balance as JSON and as a live stream for the badge. Every route reads only the account
the token names, and only reads."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from datetime import date, datetime, timedelta
from datetime import time as day_start
from typing import Annotated, Any
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from tokenledger.config import Settings
from tokenledger.dashboard.access import PageError, api_state, user_claims
from tokenledger.dashboard.links import LinkClaims, user_path
from tokenledger.dashboard.queries import open_holds
from tokenledger.dashboard.render import page, query, secure, start_clock, timed
from tokenledger.db.uow import unit_of_work
from tokenledger.errors import AccountNotFound
from tokenledger.ledger.models import ENTRY_TYPES
from tokenledger.ledger.reports import affordability, balance, get_account, history
from tokenledger.renewals.service import eligibility
from tokenledger.timeutil import as_utc, utcnow

router = APIRouter(prefix="/dashboard/u/{token}", include_in_schema=False,
                   dependencies=[Depends(start_clock)])
PAGE_SIZE = 50
RECENT = 10
# A badge's stream: re-read the balance this often without a notice (notices are at most
# once), and end after STREAM_SECONDS (the browser reconnects; a server can stop).
REREAD_SECONDS = 20.0
STREAM_SECONDS = 60.0

Claims = Annotated[LinkClaims, Depends(user_claims)]


def _base(token: str, claims: LinkClaims, tz: str) -> dict[str, Any]:
    return {"token_path": user_path(token), "user_id": claims.user_id, "tz": tz,
            "link_expires": claims.expires_at, "operator": None}


def _account(session: Any, user_id: str) -> Any:
    try:
        return get_account(session, user_id)
    except AccountNotFound:
        raise PageError(404, "No such account", "this link names an account that does not "
                                                "exist") from None


@router.get("")
def overview(request: Request, token: str, claims: Claims) -> Response:
    """Balance, wallets with their expiry, open holds, each feature ready or not, the next
    reset or renewal in the account's timezone, the latest entries."""
    with unit_of_work(api_state(request).settings) as uow:
        session, catalog, now = uow.session, uow.catalog, uow.now
        account = _account(session, claims.user_id)
        b = balance(session, claims.user_id, now)
        features = affordability(session, claims.user_id, catalog, now)
        next_grant = eligibility(session, claims.user_id, catalog, now)
        holds = open_holds(session, account.id)
        recent = history(session, claims.user_id, limit=RECENT)
    descriptions = {code: spec.description for code, spec in catalog.features.items()}
    return page(request, "user/overview.html", {
        **_base(token, claims, b.timezone), "balance": b, "features": features,
        "descriptions": descriptions, "next_grant": next_grant, "holds": holds,
        "recent": recent, "held": sum(h["amount"] for h in holds),
        "project": next((f for f in features if f["feature"] == "project_creation"), None)})


def _local_day(text: str | None, tz: str, field: str) -> datetime | None:
    if not text:
        return None
    try:
        day = date.fromisoformat(text)
    except ValueError:
        raise PageError(400, "Bad date", f"{field}: expected a date like 2026-12-31") from None
    return as_utc(datetime.combine(day, day_start(0), tzinfo=ZoneInfo(tz)))


@router.get("/history")
def history_page(request: Request, token: str, claims: Claims,
                 type: Annotated[str | None, Query(max_length=16)] = None,  # noqa: A002
                 since: Annotated[str | None, Query(alias="from", max_length=10)] = None,
                 until: Annotated[str | None, Query(alias="to", max_length=10)] = None,
                 before: Annotated[int | None, Query(ge=1, le=2**63 - 1)] = None,
                 after: Annotated[int | None, Query(ge=1, le=2**63 - 1)] = None) -> Response:
    """The ledger newest first with each wallet's balance after the entry, filtered by
    type and by local dates, a page at a time (keyset)."""
    if type and type not in ENTRY_TYPES:
        raise PageError(400, "Unknown entry type", f"type: one of {', '.join(ENTRY_TYPES)}")
    with unit_of_work(api_state(request).settings) as uow:
        account = _account(uow.session, claims.user_id)
        tz = account.timezone
        start = _local_day(since, tz, "from")
        end = _local_day(until, tz, "to")
        if end is not None:
            end += timedelta(days=1)
        rows = history(uow.session, claims.user_id, limit=PAGE_SIZE + 1, type_=type or None,
                       start=start, end=end, before=before, after=after)
    more = len(rows) > PAGE_SIZE
    if after is not None:
        rows, newer, older = rows[-PAGE_SIZE:], more, True
    else:
        rows, newer, older = rows[:PAGE_SIZE], before is not None, more
    here = user_path(token) + "/history"
    filters = {"type": type, "from": since, "to": until}
    return page(request, "user/history.html", {
        **_base(token, claims, tz), "rows": rows, "types": ENTRY_TYPES, "filters": filters,
        "newer": query(here, **filters, after=rows[0]["id"]) if newer and rows else None,
        "older": query(here, **filters, before=rows[-1]["id"]) if older and rows else None})


def _balance_data(settings: Settings, user_id: str) -> dict[str, Any]:
    with unit_of_work(settings) as uow:
        b = balance(uow.session, user_id, uow.now)
    return {"userId": user_id, "balance": b.balance, "plan": b.plan,
            "asOf": utcnow().isoformat()}


def _open_cors(response: Response) -> Response:
    # The badge runs in the app's own pages: any origin may read, none with credentials.
    secure(response)
    response.headers["Access-Control-Allow-Origin"] = "*"
    return response


@router.get("/balance.json")
def balance_json(request: Request, claims: Claims) -> Response:
    """The balance alone, for the badge (readable from the app's own origin)."""
    try:
        data = _balance_data(api_state(request).settings, claims.user_id)
    except AccountNotFound:
        return _open_cors(JSONResponse({"error": "account not found"}, status_code=404))
    return timed(request, _open_cors(JSONResponse(data)))


@router.get("/events")
async def balance_events(request: Request, claims: Claims) -> Response:
    """Server-sent events: the balance now, then after every ``balance_changed`` of this
    account (and every REREAD_SECONDS), until the link expires or STREAM_SECONDS pass."""
    state = api_state(request)
    feed = request.app.state.dashboard_feed
    live = await feed.start()
    queue = feed.listen(claims.user_id)

    async def _stream() -> AsyncIterator[str]:
        deadline = time.monotonic() + min(STREAM_SECONDS, claims.seconds_left(utcnow()))
        last: int | None = None
        try:
            yield "retry: 3000\n\n"
            while True:
                try:
                    data = await run_in_threadpool(_balance_data, state.settings,
                                                   claims.user_id)
                except AccountNotFound:
                    yield "event: gone\ndata: {}\n\n"
                    return
                if data["balance"] != last:
                    last = data["balance"]
                    yield f"event: balance\ndata: {json.dumps(data)}\n\n"
                left = deadline - time.monotonic()
                if left <= 0:
                    if claims.seconds_left(utcnow()) <= 0:
                        yield "event: expired\ndata: {}\n\n"
                    return
                try:
                    await asyncio.wait_for(queue.get(), min(left, REREAD_SECONDS if live
                                                            else 5.0))
                except TimeoutError:
                    yield ": still here\n\n"
        finally:
            feed.forget(claims.user_id, queue)

    response = StreamingResponse(_stream(), media_type="text/event-stream")
    response.headers["X-Accel-Buffering"] = "no"
    return _open_cors(response)


@router.get("/badge")
def badge_page(request: Request, token: str, claims: Claims) -> Response:
    """The badge alone on a page, for apps that would rather embed an iframe."""
    return page(request, "user/badge.html", {**_base(token, claims, "UTC")}, frames="*")
