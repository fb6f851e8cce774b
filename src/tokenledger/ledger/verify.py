"""The ledger's invariants, checked against the stored rows."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from tokenledger.ledger.models import CARRY_FORWARD, Account, EventOutcome, LedgerEntry, Wallet

SYSTEM_ENTRY_TYPES = ("RENEWAL", "DAILY_RESET", "EXPIRY")


@dataclass
class VerifyReport:
    wallets: int = 0
    entries: int = 0
    outcomes: int = 0
    balance_mismatches: list[dict[str, Any]] = field(default_factory=list)
    chain_breaks: list[dict[str, Any]] = field(default_factory=list)
    applied_twice: list[dict[str, Any]] = field(default_factory=list)
    entries_without_outcome: list[dict[str, Any]] = field(default_factory=list)
    carry_forwards: int = 0
    carry_forward_breaks: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.balance_mismatches or self.chain_breaks or self.applied_twice
                    or self.entries_without_outcome or self.carry_forward_breaks)

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, **asdict(self)}


def verify(session: Session, limit: int = 100) -> VerifyReport:
    """Every wallet's balance equals the sum of its entries, each entry continues the one
    before it, no event key was applied twice, and each carry-forward opens its wallet and
    equals the sum of the archived entries it folded. Read-only."""
    report = VerifyReport()
    report.wallets = session.scalar(select(func.count()).select_from(Wallet)) or 0
    report.entries = session.scalar(select(func.count()).select_from(LedgerEntry)) or 0
    report.outcomes = session.scalar(select(func.count()).select_from(EventOutcome)) or 0

    sums = (select(LedgerEntry.wallet_id, func.sum(LedgerEntry.amount).label("total"))
            .group_by(LedgerEntry.wallet_id).subquery())
    total = func.coalesce(sums.c.total, 0)
    for row in session.execute(
        select(Wallet.id, Account.user_id, Wallet.wallet_type, Wallet.balance,
               total.label("total"))
        .join(Account, Account.id == Wallet.account_id)
        .outerjoin(sums, sums.c.wallet_id == Wallet.id)
        .where(Wallet.balance != total).limit(limit)
    ):
        report.balance_mismatches.append(dict(row._mapping))

    for row in session.execute(text(
        "SELECT id, wallet_id, balance_before, previous FROM ("
        " SELECT id, wallet_id, balance_before,"
        "  COALESCE(LAG(balance_after) OVER (PARTITION BY wallet_id ORDER BY id), 0)"
        "  AS previous FROM ledger_entries) AS chained"
        " WHERE balance_before <> previous LIMIT :limit"), {"limit": limit}
    ):
        report.chain_breaks.append(dict(row._mapping))

    for row in session.execute(
        select(LedgerEntry.event_key, LedgerEntry.wallet_id, LedgerEntry.type,
               func.count().label("times"))
        .where(LedgerEntry.event_key.is_not(None))
        .group_by(LedgerEntry.event_key, LedgerEntry.wallet_id, LedgerEntry.type)
        .having(func.count() > 1).limit(limit)
    ):
        report.applied_twice.append(dict(row._mapping))

    for row in session.execute(
        select(LedgerEntry.id, LedgerEntry.event_key, EventOutcome.outcome)
        .outerjoin(EventOutcome, EventOutcome.key == LedgerEntry.event_key)
        .where(LedgerEntry.event_key.is_not(None))
        # Scheduled system grants are not client events: their once-per-period record is
        # the entry's own unique (event_key, wallet_id, type), not an outcome row.
        .where(LedgerEntry.type.not_in(SYSTEM_ENTRY_TYPES))
        .where((EventOutcome.outcome.is_(None)) | (EventOutcome.outcome != "applied"))
        .limit(limit)
    ):
        report.entries_without_outcome.append(dict(row._mapping))

    # A compaction folds a wallet's oldest entries into one CARRY_FORWARD (from 0, so the
    # chain check above covers its arithmetic): it must come first in its wallet and carry
    # exactly what the archive says it folded.
    report.carry_forwards = session.scalar(
        select(func.count()).select_from(LedgerEntry)
        .where(LedgerEntry.type == CARRY_FORWARD)) or 0
    if report.carry_forwards:
        for row in session.execute(text(
            "SELECT * FROM ("
            " SELECT c.id, c.wallet_id, c.amount, coalesce(sum(a.amount), 0) AS archived,"
            "  EXISTS (SELECT FROM ledger_entries AS e WHERE e.account_id = c.account_id"
            "          AND e.wallet_id = c.wallet_id AND e.id < c.id) AS not_first"
            " FROM ledger_entries AS c"
            " LEFT JOIN ledger_entries_archive AS a ON a.carried_into = c.id"
            " WHERE c.type = 'CARRY_FORWARD' GROUP BY c.id) AS f"
            " WHERE amount <> archived OR not_first LIMIT :limit"), {"limit": limit}
        ):
            report.carry_forward_breaks.append(dict(row._mapping))
    return report
