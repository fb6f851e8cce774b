"""What happens when a run ends: metrics, and a critical alert when too many accounts failed.

The sealing unit of work judges the run (:func:`run_finished`: the alert flag is written
with the seal); counting, logging and the webhook happen after it committed, so an alert
never holds a database lock, and a webhook that is down is logged, never breaks the run.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx
from prometheus_client import Counter
from sqlalchemy import update

from tokenledger.config import Settings
from tokenledger.db.uow import UnitOfWork, unit_of_work
from tokenledger.renewals.models import RenewalRun
from tokenledger.timeutil import utcnow

log = logging.getLogger("tokenledger.renewals")

RUNS = Counter("tokenledger_renewal_runs_total", "Renewal runs finished, by kind and result.",
               ["kind", "result"])
ACCOUNTS = Counter("tokenledger_renewal_accounts_total",
                   "Accounts processed by renewal runs, by kind and outcome.",
                   ["kind", "outcome"])
ALERTS = Counter("tokenledger_renewal_alerts_total",
                 "Critical failure-rate alerts raised by renewal runs.", ["kind"])
WEBHOOK_FAILURES = Counter("tokenledger_alert_webhook_failures_total",
                           "Alert webhook POSTs that failed.")

WEBHOOK_TIMEOUT = 5.0


def failure_rate_exceeded(failed: int, successful: int, ratio: float) -> bool:
    """The seeds' rule: alert when ``failed > ratio × successful``."""
    return failed > ratio * successful


def alert_payload(report: dict[str, Any], ratio: float) -> dict[str, Any]:
    """The JSON body POSTed to the alert webhook."""
    processed = report["total_processed"] or 0
    return {
        "alert": "renewal_failure_rate",
        "severity": "critical",
        "message": (f"{report['kind']} renewal run {report['id']}: {report['failed']} of "
                    f"{processed} accounts failed (threshold: failed > {ratio} × successful)"),
        "run_id": report["id"],
        "kind": report["kind"],
        "trigger": report["trigger"],
        "tier": report["tier"],
        "status": report["status"],
        "total_processed": processed,
        "successful": report["successful"],
        "failed": report["failed"],
        "failure_rate_percent": round(100 * report["failed"] / processed, 2) if processed else 0,
        "alert_failure_ratio": ratio,
        "errors": report["errors"][:20],
        "as_of": report["as_of"],
        "finished_at": report["finished_at"],
    }


def post_alert(url: str, payload: dict[str, Any]) -> bool:
    """POST ``payload`` as JSON; True on a 2xx answer. Never raises."""
    try:
        response = httpx.post(url, json=payload, timeout=WEBHOOK_TIMEOUT)
        response.raise_for_status()
        return True
    except httpx.HTTPError as exc:
        WEBHOOK_FAILURES.inc()
        log.error("alert webhook POST to %s failed: %s", url, exc)
        return False


def run_finished(uow: UnitOfWork, report: dict[str, Any]) -> None:
    """Judge a run sealed in ``uow`` (``report`` as the seal wrote it): flag the
    failure-rate alert in the same transaction, and count, log and send it once committed.

    Dry runs only warn: they change nothing, so nobody should be paged for them.
    """
    ratio = uow.settings.alert_failure_ratio
    alert = failure_rate_exceeded(report["failed"], report["successful"], ratio)
    if alert and not report["dry_run"]:
        uow.session.execute(update(RenewalRun).where(RenewalRun.id == report["id"])
                            .values(alert=True))
        report["alert"] = True
    settings = uow.settings
    uow.after_commit(lambda: _announce(settings, report, alert))


def _announce(settings: Settings, report: dict[str, Any], alert: bool) -> None:
    kind, run_id = report["kind"], report["id"]
    RUNS.labels(kind=kind, result=report["status"]).inc()
    for outcome in ("successful", "failed", "skipped"):
        if report[outcome]:
            ACCOUNTS.labels(kind=kind, outcome=outcome).inc(report[outcome])
    log.info("%s run %s %s: %s processed, %s successful, %s failed, %s skipped, %s tokens",
             kind, run_id, report["status"], report["total_processed"], report["successful"],
             report["failed"], report["skipped"], report["tokens_granted"])
    if not alert:
        return
    payload = alert_payload(report, settings.alert_failure_ratio)
    if report["dry_run"]:
        log.warning("dry run would alert: %s", payload["message"])
        return
    log.critical("high failure rate in %s renewal: %s", kind, payload["message"],
                 extra={"alert": payload})
    ALERTS.labels(kind=kind).inc()
    if settings.alert_webhook_url and post_alert(settings.alert_webhook_url, payload):
        # The delivery's own record, once the webhook answered.
        with unit_of_work(settings) as uow:
            uow.session.execute(update(RenewalRun).where(RenewalRun.id == run_id)
                                .values(alert_sent_at=utcnow()))
