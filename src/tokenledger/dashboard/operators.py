"""The operators' pages (admin key or session): accounts, renewal and reset runs, dead
letters and conflicts, the queue, usage and margin; and signing in and out.

Pages only read; every change is a form posted to ``dashboard.actions`` and confirmed
there. Each page reads a bounded page of rows through an index.
"""

from __future__ import annotations

import json
from datetime import timedelta
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from tokenledger.dashboard import auth, charts, queries
from tokenledger.dashboard.access import (
    PageError,
    api_state,
    check_csrf,
    form,
    operator,
    safe_next,
)
from tokenledger.dashboard.render import page, query, secure, start_clock
from tokenledger.db.uow import unit_of_work
from tokenledger.errors import AccountNotFound, TokenLedgerError, ValidationFailed
from tokenledger.ledger.models import ENTRY_TYPES
from tokenledger.ledger.reports import (
    balance,
    get_account,
    history,
    month_bounds,
    monthly_report,
    usage,
)
from tokenledger.ops import metrics
from tokenledger.queue.deadletters import depth, list_dead_letters
from tokenledger.renewals.models import RUN_KINDS
from tokenledger.renewals.service import RunNotFound, eligibility, list_runs, run_report

router = APIRouter(prefix="/dashboard", include_in_schema=False,
                   dependencies=[Depends(start_clock)])
Who = Annotated[auth.Operator, Depends(operator)]
UserId = Annotated[str, Query(min_length=1, max_length=128)]
Id = Annotated[int | None, Query(ge=1, le=2**63 - 1)]
PAGE_SIZE = 50


def flower_url(request: Request) -> str:
    """Where Flower is: TOKENLEDGER_FLOWER_URL, else port 5555 of this host."""
    configured = api_state(request).settings.flower_url
    return configured or f"{request.url.scheme}://{request.url.hostname}:5555/"


# What a page says after an action sent the browser to it (``?done=<action>``).
NOTICES = {
    "open-account": "Account opened.",
    "change-plan": "Plan changed.",
    "dry-run": "Dry run started; this page follows it.",
    "retry-dead-letter": "Dead letter published again; the workers validate it again.",
    "drop-dead-letter": "Dead letter dropped.",
    "drop-conflict": "Conflict dropped.",
}


def ops_page(request: Request, who: auth.Operator, template: str, context: dict[str, Any],
             nav: str, status: int = 200) -> Response:
    """An operator page, with the navigation, the operator and any notice."""
    notice = NOTICES.get(request.query_params.get("done", ""))
    return page(request, template, {"operator": who, "nav": nav, "notice": notice,
                                    "flower_url": flower_url(request), **context}, status)


# -- signing in --------------------------------------------------------------------------


@router.get("")
@router.get("/")
def home() -> Response:
    """The dashboard's front door: the accounts (or the login form first)."""
    response = RedirectResponse("/dashboard/ops/accounts", status_code=303)
    secure(response)
    return response


def _login_page(request: Request, next_path: str, message: str | None,
                status: int = 200) -> Response:
    settings = api_state(request).settings
    enabled = settings.dashboard_secret is not None
    nonce = auth.login_nonce()
    response = page(request, "login.html", {
        "operator": None, "enabled": enabled, "message": message, "next": next_path,
        "csrf": auth.login_token(settings, nonce) if enabled else ""}, status)
    if enabled:
        response.set_cookie(auth.LOGIN_COOKIE, nonce, max_age=3600, path="/dashboard",
                            httponly=True, samesite="strict",
                            secure=request.url.scheme == "https")
    return response


@router.get("/login")
def login_form(request: Request,
               next: Annotated[str | None, Query(max_length=2000)] = None) -> Response:  # noqa: A002
    """The login form (with its CSRF nonce cookie)."""
    return _login_page(request, safe_next(next), None)


@router.post("/login")
async def login(request: Request) -> Response:
    """Exchange an admin key for a session cookie (HttpOnly, SameSite=Strict)."""
    fields = await form(request)
    settings = api_state(request).settings
    next_path = safe_next(fields.get("next"))
    if settings.dashboard_secret is None:
        return _login_page(request, next_path, None, 503)
    if not auth.login_token_ok(settings, request.cookies.get(auth.LOGIN_COOKIE),
                               fields.get("csrf")):
        return _login_page(request, next_path, "The form expired; sign in again.", 403)

    def _sign_in() -> tuple[str, auth.Operator]:
        with unit_of_work(settings) as uow:
            return auth.open_session(settings, uow.session, fields.get("api_key", ""),
                                     uow.now)

    try:
        cookie, _ = await run_in_threadpool(_sign_in)
    except auth.NotAdmin as exc:
        return _login_page(request, next_path, str(exc), 403)
    except TokenLedgerError:
        return _login_page(request, next_path, "That is not a valid API key.", 401)
    response = RedirectResponse(next_path, status_code=303)
    secure(response)
    response.set_cookie(auth.SESSION_COOKIE, cookie, max_age=auth.SESSION_SECONDS,
                        path="/dashboard", httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")
    response.delete_cookie(auth.LOGIN_COOKIE, path="/dashboard")
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    """End the session (a CSRF-checked form)."""
    fields = await form(request)
    who = await run_in_threadpool(operator, request)
    check_csrf(who, fields)
    response = RedirectResponse("/dashboard/login", status_code=303)
    secure(response)
    response.delete_cookie(auth.SESSION_COOKIE, path="/dashboard")
    return response


# -- accounts ----------------------------------------------------------------------------


@router.get("/ops/accounts")
def accounts(request: Request, who: Who,
             q: Annotated[str, Query(max_length=128)] = "",
             after: Annotated[str | None, Query(max_length=128)] = None) -> Response:
    """Accounts whose user id starts with ``q``, a page at a time; the open-account form."""
    with unit_of_work(api_state(request).settings) as uow:
        rows, more = queries.search_accounts(uow.session, q, after, PAGE_SIZE)
        plans = sorted(uow.catalog.plans)
        default_plan = uow.catalog.default_plan
    return ops_page(request, who, "ops/accounts.html", {
        "rows": rows, "q": q, "plans": plans, "default_plan": default_plan,
        "timezone": api_state(request).settings.timezone,
        "more": query("/dashboard/ops/accounts", q=q, after=rows[-1]["user_id"])
        if more and rows else None}, "accounts")


@router.get("/ops/account")
def account(request: Request, who: Who, user_id: UserId, before: Id = None, after: Id = None,
            type: Annotated[str | None, Query(max_length=16)] = None  # noqa: A002
            ) -> Response:
    """One account: plan and renewal, wallets, open holds, its ledger a page at a time
    with each entry's stored outcome; the credit and change-plan forms."""
    if type and type not in ENTRY_TYPES:
        raise PageError(400, "Unknown entry type", f"type: one of {', '.join(ENTRY_TYPES)}")
    with unit_of_work(api_state(request).settings) as uow:
        session, catalog, now = uow.session, uow.catalog, uow.now
        try:
            acct = get_account(session, user_id)
        except AccountNotFound:
            raise PageError(404, "No such account", f"no account {user_id!r}") from None
        b = balance(session, user_id, now)
        rows = history(session, user_id, limit=PAGE_SIZE + 1, type_=type or None,
                       before=before, after=after)
        stored = queries.outcomes(session, (r["event_key"] for r in rows))
        holds = queries.open_holds(session, acct.id)
        next_grant = eligibility(session, user_id, catalog, now)
        plans = sorted(catalog.plans)
    more = len(rows) > PAGE_SIZE
    if after is not None:
        rows, newer, older = rows[-PAGE_SIZE:], more, True
    else:
        rows, newer, older = rows[:PAGE_SIZE], before is not None, more
    here = "/dashboard/ops/account"
    return ops_page(request, who, "ops/account.html", {
        "account": acct, "balance": b, "rows": rows, "stored": stored, "holds": holds,
        "next_grant": next_grant, "plans": plans, "types": ENTRY_TYPES, "type": type,
        "newer": query(here, user_id=user_id, type=type, after=rows[0]["id"])
        if newer and rows else None,
        "older": query(here, user_id=user_id, type=type, before=rows[-1]["id"])
        if older and rows else None}, "accounts")


@router.get("/ops/outcome")
def outcome(request: Request, who: Who,
            key: Annotated[str, Query(min_length=1, max_length=255)]) -> Response:
    """What happened to one event key: its stored outcome, dead letters and conflicts."""
    from sqlalchemy import select

    from tokenledger.ledger.models import EventConflict
    from tokenledger.queue.models import DeadLetter

    with unit_of_work(api_state(request).settings) as uow:
        stored = queries.outcomes(uow.session, [key]).get(key)
        letters = [dict(r._mapping) for r in uow.session.execute(
            select(DeadLetter.id, DeadLetter.reason, DeadLetter.attempts, DeadLetter.last_seen)
            .where(DeadLetter.key == key).order_by(DeadLetter.id).limit(20))]
        conflicts = [dict(r._mapping) for r in uow.session.execute(
            select(EventConflict.id, EventConflict.seen_at, EventConflict.payload_hash)
            .where(EventConflict.key == key).order_by(EventConflict.id).limit(20))]
    return ops_page(request, who, "ops/outcome.html", {
        "key": key, "stored": stored, "letters": letters, "conflicts": conflicts},
        "accounts")


# -- renewal and reset runs --------------------------------------------------------------


@router.get("/ops/runs")
def runs(request: Request, who: Who,
         kind: Annotated[str | None, Query(pattern="^(daily|monthly)$")] = None) -> Response:
    """Recent runs, newest first, and the dry-run form."""
    with unit_of_work(api_state(request).settings) as uow:
        rows = list_runs(uow.session, kind, limit=PAGE_SIZE)
        plans = sorted(uow.catalog.plans)
    return ops_page(request, who, "ops/runs.html", {
        "rows": rows, "kind": kind, "kinds": RUN_KINDS, "plans": plans}, "runs")


@router.get("/ops/runs/{run_id}")
def run(request: Request, who: Who, run_id: int) -> Response:
    """One run: options, totals, errors, its alert and (dry runs) what it would change."""
    if not 1 <= run_id <= 2**63 - 1:
        raise PageError(404, "No such run", f"no run {run_id}")
    with unit_of_work(api_state(request).settings) as uow:
        try:
            report = run_report(uow.session, run_id, changes_limit=200)
        except RunNotFound:
            raise PageError(404, "No such run", f"no run {run_id}") from None
    return ops_page(request, who, "ops/run.html", {"run": report}, "runs")


# -- dead letters and conflicts ----------------------------------------------------------


@router.get("/ops/dead-letters")
def dead_letters(request: Request, who: Who) -> Response:
    """The oldest dead letters with their reason and payload; retry or drop each."""
    with unit_of_work(api_state(request).settings) as uow:
        rows = list_dead_letters(uow.session, PAGE_SIZE)
        total = depth(uow.session)
    for row in rows:
        row["payload_text"] = _pretty(row["payload"])
    return ops_page(request, who, "ops/dead_letters.html", {"rows": rows, "total": total},
                    "dead-letters")


def _pretty(stored: str, limit: int = 4000) -> str:
    """A stored payload indented for reading (as stored when it is not JSON)."""
    try:
        text = json.dumps(json.loads(stored), indent=2, sort_keys=True)
    except ValueError:
        text = stored
    return text if len(text) <= limit else text[:limit] + "\n… (cut)"


@router.get("/ops/conflicts")
def conflicts(request: Request, who: Who, before: Id = None) -> Response:
    """Keys reused with another payload (never applied), newest first, beside what the
    key's first payload did; retry one under a new key, or drop it."""
    with unit_of_work(api_state(request).settings) as uow:
        rows, more = queries.conflicts(uow.session, before, PAGE_SIZE)
        total = queries.count_conflicts(uow.session)
    return ops_page(request, who, "ops/conflicts.html", {
        "rows": rows, "total": total,
        "older": query("/dashboard/ops/conflicts", before=rows[-1]["id"])
        if more and rows else None}, "conflicts")


# -- the queue ---------------------------------------------------------------------------


def _safe(read: Any) -> Any:
    try:
        return read()
    except Exception as exc:  # noqa: BLE001 - the page shows what it could not read
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}


@router.get("/ops/queue")
def queue(request: Request, who: Who) -> Response:
    """Backlog per queue, unacknowledged messages, dead letters, conflicts, open holds,
    outcomes per second over the last hour, the last runs; the workers load after."""
    settings = api_state(request).settings
    queues = [settings.queue] + ([settings.renewal_queue] if settings.renewal_queue else [])
    backlog = _safe(lambda: metrics.queue_depths(settings, queues))
    pending = _safe(lambda: metrics.unacked(settings))
    with unit_of_work(settings) as uow:
        labels, series = queries.events_per_minute(uow.session, uow.now)
        dead = depth(uow.session)
        conflicts_total = queries.count_conflicts(uow.session)
        last_runs = list_runs(uow.session, None, limit=5)
    holds = _safe(lambda: metrics.holds_open(settings))
    chart = charts.bars(labels, series, unit="events/s", every=10,
                        title="Events stored per second, per minute of the last hour (UTC)")
    total = [sum(values[i] for values in series.values()) for i in range(len(labels))]
    return ops_page(request, who, "ops/queue.html", {
        "backlog": backlog, "unacked": pending, "dead": dead, "conflicts": conflicts_total,
        "holds": holds, "chart": chart, "runs": last_runs,
        "last_minute": total[-2] if len(total) > 1 else 0,
        "hour_rate": sum(total) / max(len(total), 1)}, "queue")


@router.get("/ops/queue/workers")
def workers(request: Request, who: Who) -> Response:
    """The workers answering a ping now (a fragment the queue page loads)."""
    seen = queries.workers_seen(api_state(request).settings)
    return page(request, "ops/workers.html", {"seen": seen})


# -- usage and margin --------------------------------------------------------------------


@router.get("/ops/usage")
def usage_page(request: Request, who: Who,
               days: Annotated[int, Query(ge=1, le=92)] = 7,
               user_id: Annotated[str | None, Query(max_length=128)] = None,
               month: Annotated[str | None, Query(pattern=r"^\d{4}-(0[1-9]|1[0-2])$")] = None,
               credit_value: Annotated[str | None, Query(max_length=32)] = None) -> Response:
    """Credits charged per feature and provider cost per day (a chart), usage and margin
    per feature and model; with an account, its monthly report."""
    value = _credit_value(credit_value)
    with unit_of_work(api_state(request).settings) as uow:
        session, catalog, now = uow.session, uow.catalog, uow.now
        try:
            data = usage(session, now - timedelta(days=days), now, catalog,
                         user_id=user_id or None, credit_value=value)
            report = (monthly_report(session, user_id, month, now, catalog=catalog,
                                     credit_value=value) if user_id else None)
        except AccountNotFound:
            raise PageError(404, "No such account", f"no account {user_id!r}") from None
        except ValidationFailed as exc:
            raise PageError(400, "Bad request", str(exc)) from None
    labels = [d[5:] for d in data["days"]]
    provider = [sum(v[i] for v in data["provider_cost_by_model"].values())
                for i in range(len(labels))]
    every = max(1, len(labels) // 12)
    chart = charts.bars(labels, data["credits_by_feature"], unit="credits",
                        line=("provider cost", provider), line_unit="provider cost",
                        every=every,
                        title="Credits charged per feature and provider cost, per day (UTC)")
    models = charts.bars(labels, data["provider_cost_by_model"], unit="provider cost",
                         every=every, height=200,
                         title="Provider cost per model, per day (UTC)")
    return ops_page(request, who, "ops/usage.html", {
        "data": data, "chart": chart, "models_chart": models, "report": report, "days": days,
        "user_id": user_id or "", "month": month or "", "credit_value": credit_value or "",
        "bounds": month_bounds(report["month"], report["period"]["timezone"])
        if report else None}, "usage")


def _credit_value(text: str | None) -> Decimal | None:
    if not text:
        return None
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise PageError(400, "Bad credit value", "credit_value: a number, e.g. 0.01") from None
    if not value.is_finite() or not 0 <= value <= 10**6:
        raise PageError(400, "Bad credit value", "credit_value: between 0 and 1,000,000")
    return value

