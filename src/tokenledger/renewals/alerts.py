"""What happens when a run ends: metrics, a ``renewal_run_finished`` webhook, and a critical
``renewal_failure_alert`` when too many accounts failed.

The sealing unit of work judges the run (:func:`run_finished`): the alert flag and both
webhook deliveries are written with the seal, in its transaction (the outbox; the
workers deliver them, signed and retried, to the endpoints subscribed and to
``TOKENLEDGER_ALERT_WEBHOOK_URL``); counting and logging happen once it committed.
"""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import Counter
from sqlalchemy import update

from tokenledger.config import Settings
from tokenledger.db.uow import UnitOfWork
from tokenledger.renewals.models import RenewalRun
from tokenledger.webhooks import service as webhooks
from tokenledger.webhooks.service import WebhookEvent

log = logging.getLogger("tokenledger.renewals")

RUNS = Counter("tokenledger_renewal_runs_total", "Renewal runs finished, by kind and result.",
               ["kind", "result"])
ACCOUNTS = Counter("tokenledger_renewal_accounts_total",
                   "Accounts processed by renewal runs, by kind and outcome.",
                   ["kind", "outcome"])
ALERTS = Counter("tokenledger_renewal_alerts_total",
                 "Critical failure-rate alerts raised by renewal runs.", ["kind"])
FINISHED_FIELDS = ("kind", "trigger", "tier", "status", "dry_run", "total_processed",
                   "successful", "failed", "skipped", "tokens_granted", "alert", "as_of",
                   "finished_at")


def failure_rate_exceeded(failed: int, successful: int, ratio: float) -> bool:
    """The seeds' rule: alert when ``failed > ratio × successful``."""
    return failed > ratio * successful


def alert_payload(report: dict[str, Any], ratio: float) -> dict[str, Any]:
    """The data of the ``renewal_failure_alert`` webhook."""
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


def run_finished(uow: UnitOfWork, report: dict[str, Any]) -> None:
    """Judge a run sealed in ``uow`` (``report`` as the seal wrote it): flag the
    failure-rate alert and record the run's webhooks in the same transaction; count and
    log once committed.

    Dry runs only warn: they change nothing, so nobody should be paged for them.
    """
    ratio = uow.settings.alert_failure_ratio
    alert = failure_rate_exceeded(report["failed"], report["successful"], ratio)
    if alert and not report["dry_run"]:
        uow.session.execute(update(RenewalRun).where(RenewalRun.id == report["id"])
                            .values(alert=True))
        report["alert"] = True
    run_id = report["id"]
    events = [WebhookEvent("renewal_run_finished", f"run:{run_id}",
                           {"run_id": run_id, **{k: report[k] for k in FINISHED_FIELDS}},
                           f"renewal_run_finished:{run_id}")]
    if alert and not report["dry_run"]:
        events.append(WebhookEvent("renewal_failure_alert", f"run:{run_id}",
                                   alert_payload(report, ratio),
                                   f"renewal_failure_alert:{run_id}"))
    webhooks.record(uow, events)
    settings = uow.settings
    uow.after_commit(lambda: _announce(settings, report, alert))


def _announce(settings: Settings, report: dict[str, Any], alert: bool) -> None:
    kind = report["kind"]
    RUNS.labels(kind=kind, result=report["status"]).inc()
    for outcome in ("successful", "failed", "skipped"):
        if report[outcome]:
            ACCOUNTS.labels(kind=kind, outcome=outcome).inc(report[outcome])
    log.info("%s run %s %s: %s processed, %s successful, %s failed, %s skipped, %s tokens",
             kind, report["id"], report["status"], report["total_processed"],
             report["successful"], report["failed"], report["skipped"],
             report["tokens_granted"])
    if not alert:
        return
    payload = alert_payload(report, settings.alert_failure_ratio)
    if report["dry_run"]:
        log.warning("dry run would alert: %s", payload["message"])
        return
    log.critical("high failure rate in %s renewal: %s", kind, payload["message"],
                 extra={"alert": payload})
    ALERTS.labels(kind=kind).inc()
