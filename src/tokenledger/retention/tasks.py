"""Retention's task: the scheduled compaction (beat, when TOKENLEDGER_RETENTION_ENABLED)."""

from __future__ import annotations

from typing import Any

from tokenledger.queue.app import app
from tokenledger.queue.base import LedgerTask, log
from tokenledger.queue.names import COMPACT_LEDGER
from tokenledger.retention.compaction import compact
from tokenledger.timeutil import parse_age


class RetentionTask(LedgerTask):
    """LedgerTask whose give-up path only logs: the run records its own failure, and the
    next scheduled one picks up where it stopped."""

    abstract = True

    def dead_letter(self, payload: Any, reason: str, key: str | None = None) -> None:
        log.error("compaction gave up: %s", reason)


@app.task(base=RetentionTask, bind=True, name=COMPACT_LEDGER)
def compact_ledger(self: RetentionTask, older_than: str = "400d") -> dict[str, Any]:
    """Fold entries older than ``older_than`` into carry-forwards; safe to run twice."""
    report = compact(self.settings, parse_age(older_than), trigger="beat")
    return report.as_dict()
