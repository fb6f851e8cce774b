"""/api/renewals and /api/billing/daily-reset: renewal runs and the daily reset (seed 001's
cron endpoint), for admin keys."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Path, Query
from fastapi.responses import JSONResponse

from tokenledger.api.auth import ADMIN, require
from tokenledger.api.deps import AUTH_ERRORS, Api, ApiState, camel_keys, respond
from tokenledger.api.schemas import Envelope, RenewalRunIn, RunIn
from tokenledger.db.uow import unit_of_work
from tokenledger.renewals import runs as runner
from tokenledger.renewals.service import (
    RunOptions,
    due_count,
    last_scheduled_run,
    list_runs,
    run_report,
)
from tokenledger.timeutil import utcnow

billing = APIRouter(prefix="/api/billing", tags=["billing"], responses=AUTH_ERRORS,
                    dependencies=[Depends(require(*ADMIN))])
renewals = APIRouter(prefix="/api/renewals", tags=["renewals"], responses=AUTH_ERRORS,
                     dependencies=[Depends(require(*ADMIN))])
Wait = Annotated[float, Query(ge=0, le=60, description="Seconds to wait for the run to finish "
                                                       "(0: answer 202 at once)")]
RUN_ACCEPTED = {202: {"model": Envelope[dict[str, Any]],
                      "description": "Started; GET /api/renewals/runs/{id} for progress"}}


def _run(api: ApiState, options: RunIn, kind: str, wait: float,
         shape: Callable[[Any], Any] = lambda report: report) -> JSONResponse:
    """Plan the run, hand its chunks to the workers, wait (bounded) for it to finish;
    answer its report in ``shape`` (the seed route's names, or the API's convention)."""
    settings = api.settings
    run_options = RunOptions(kind=kind, tier=options.tier, limit=options.limit,
                             dry_run=options.dry_run,
                             continue_on_error=options.continue_on_error,
                             chunk_size=settings.renewal_chunk_size, trigger="api")
    run_id, chunk_ids = runner.start_run(settings, run_options)
    if chunk_ids:
        runner.dispatch(settings, chunk_ids, producer=api.client.producer)
    report = runner.wait_for_run(settings, run_id, timeout=wait, interval=0.1)
    if report["finished_at"] is None:
        return respond(202, shape(report),
                       f"Run {run_id} started; GET /api/renewals/runs/{run_id}")
    if wait and report.get("dry_run"):
        with unit_of_work(settings) as uow:
            session = uow.session
            report = run_report(session, run_id)
    return respond(200, shape(report), f"Run {run_id} {report['status']}")


@billing.get("/daily-reset", response_model=Envelope[dict[str, Any]],
             summary="How many accounts are due for their daily reset, and the last run")
def daily_reset_status(api: Api) -> dict[str, Any]:
    now = utcnow()
    with unit_of_work(api.settings) as uow:
        session = uow.session
        due = due_count(session, "daily", uow.catalog, now)
        last = list_runs(session, "daily", limit=1)
        scheduled = last_scheduled_run(session, "daily")
    return {"success": True, "data": {
        "now": now.isoformat(), "dueAccounts": due, "needsReset": due > 0,
        "lastRun": last[0] if last else None,
        "lastScheduledRun": scheduled.isoformat() if scheduled else None}}


@billing.post("/daily-reset", response_model=Envelope[dict[str, Any]], responses=RUN_ACCEPTED,
              summary="Run the daily reset now (each account at most once per local day)")
def daily_reset_run(api: Api, body: Annotated[RunIn | None, Body()] = None,
                    wait: Wait = 10) -> JSONResponse:
    return _run(api, body or RunIn(), "daily", wait)


@renewals.post("/run", response_model=Envelope[dict[str, Any]], responses=RUN_ACCEPTED,
               summary="Start a monthly renewal (or daily reset) run: tier, limit, dry_run, "
                       "continue_on_error")
def renewal_run(api: Api, body: Annotated[RenewalRunIn | None, Body()] = None,
                wait: Wait = 10) -> JSONResponse:
    body = body or RenewalRunIn()
    return _run(api, body, body.kind, wait, camel_keys)


@renewals.get("/runs", response_model=Envelope[list[dict[str, Any]]],
              summary="Recent runs, newest first")
def renewal_runs(
    api: Api,
    kind: Annotated[str | None, Query(pattern="^(daily|monthly)$")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 20,
) -> dict[str, Any]:
    with unit_of_work(api.settings) as uow:
        session = uow.session
        return {"success": True, "data": camel_keys(list_runs(session, kind, limit=limit))}


@renewals.get("/runs/{run_id}", response_model=Envelope[dict[str, Any]],
              summary="One run: totals, errors and (for dry runs) the changes it would make")
def renewal_run_report(
    api: Api, run_id: Annotated[int, Path(ge=1, le=2**63 - 1)],
    changes_limit: Annotated[int, Query(ge=0, le=10_000)] = 1000,
) -> dict[str, Any]:
    with unit_of_work(api.settings) as uow:
        session = uow.session
        return {"success": True, "data": camel_keys(run_report(session, run_id, changes_limit))}


router = APIRouter()
router.include_router(billing)
router.include_router(renewals)
