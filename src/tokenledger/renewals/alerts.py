"""What happens when a run ends: metrics, and a critical alert when too many accounts failed.

Runs on the process that sealed the run, after its transaction committed: an alert never
holds a database lock, and a webhook that is down is logged, never breaks the run.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx
from prometheus_client import Counter
from sqlalchemy import update

from tokenledger.config import Settings
from tokenledger.db import unit_of_work
from tokenledger.renewals.models import RenewalRun
from tokenledger.renewals.service import run_report
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


def on_run_finished(settings: Settings, run_id: int) -> dict[str, Any]:
    """Count the finished run and raise the failure-rate alert when it applies.

    Call after the sealing transaction committed. Dry runs only warn: they change nothing,
    so nobody should be paged for them.
    """
    with unit_of_work(settings.database_url) as session:
        report = run_report(session, run_id, changes_limit=0)
    kind = report["kind"]
    RUNS.labels(kind=kind, result=report["status"]).inc()
    for outcome in ("successful", "failed", "skipped"):
        if report[outcome]:
            ACCOUNTS.labels(kind=kind, outcome=outcome).inc(report[outcome])
    ratio = settings.alert_failure_ratio
    log.info("%s run %s %s: %s processed, %s successful, %s failed, %s skipped, %s tokens",
             kind, run_id, report["status"], report["total_processed"], report["successful"],
             report["failed"], report["skipped"], report["tokens_granted"])
    if not failure_rate_exceeded(report["failed"], report["successful"], ratio):
        return report
    payload = alert_payload(report, ratio)
    if report["dry_run"]:
        log.warning("dry run would alert: %s", payload["message"])
        return report
    log.critical("high failure rate in %s renewal: %s", kind, payload["message"],
                 extra={"alert": payload})
    ALERTS.labels(kind=kind).inc()
    sent = post_alert(settings.alert_webhook_url, payload) if settings.alert_webhook_url \
        else False
    with unit_of_work(settings.database_url) as session:
        session.execute(update(RenewalRun).where(RenewalRun.id == run_id).values(
            alert=True, alert_sent_at=utcnow() if sent else None))
    report["alert"] = True
    return report
