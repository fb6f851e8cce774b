"""The webhook relay's task: send the due deliveries, then wake again when the next is due."""

from __future__ import annotations

from typing import Any

from tokenledger.queue.app import app
from tokenledger.queue.base import LedgerTask, log
from tokenledger.queue.names import DELIVER_WEBHOOKS
from tokenledger.timeutil import utcnow
from tokenledger.webhooks import relay


class RelayTask(LedgerTask):
    """LedgerTask whose give-up path only logs: a relay run carries no message to keep,
    and the outbox rows it did not settle are due again when their lease ends."""

    abstract = True

    def dead_letter(self, payload: Any, reason: str, key: str | None = None) -> None:
        log.error("webhook relay run gave up: %s", reason)


@app.task(base=RelayTask, bind=True, name=DELIVER_WEBHOOKS)
def deliver_webhooks(self: RelayTask) -> dict[str, Any]:
    """Send the due webhook deliveries once each; safe to run concurrently and twice."""
    report = relay.deliver_due(self.settings)
    if report.more:
        relay.wake(self.settings)
    elif report.wake_at is not None:
        self.apply_async(countdown=max(0.0, (report.wake_at - utcnow()).total_seconds()))
    return {"claimed": report.claimed, "delivered": report.delivered,
            "retrying": report.retrying, "failed": report.failed,
            "wake_at": report.wake_at.isoformat() if report.wake_at else None}
