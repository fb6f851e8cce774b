"""Read-side queries: history and balances (statistics arrive with the API)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from tokenledger.errors import AccountNotFound
from tokenledger.models import Account, LedgerEntry, Wallet
from tokenledger.timeutil import as_utc


def account_id(session: Session, user_id: str) -> int:
    found = session.scalar(select(Account.id).where(Account.user_id == user_id))
    if found is None:
        raise AccountNotFound(user_id)
    return found


def history(session: Session, user_id: str, *, limit: int = 50, offset: int = 0,
            type_: str | None = None, feature: str | None = None,
            start: datetime | None = None, end: datetime | None = None) -> list[dict[str, Any]]:
    """The account's ledger entries, newest first, filtered and paginated."""
    query = (select(LedgerEntry, Wallet.wallet_type)
             .join(Wallet, Wallet.id == LedgerEntry.wallet_id)
             .where(LedgerEntry.account_id == account_id(session, user_id)))
    if type_:
        query = query.where(LedgerEntry.type == type_)
    if feature:
        query = query.where(LedgerEntry.feature == feature)
    if start:
        query = query.where(LedgerEntry.created_at >= start)
    if end:
        query = query.where(LedgerEntry.created_at < end)
    rows = session.execute(query.order_by(LedgerEntry.id.desc()).limit(limit).offset(offset))
    return [{
        "id": e.id, "user_id": user_id, "wallet_id": e.wallet_id, "wallet_type": wallet_type,
        "amount": e.amount, "balance_before": e.balance_before, "balance_after": e.balance_after,
        "type": e.type, "feature": e.feature, "event_key": e.event_key,
        "reference": e.reference, "metadata": e.metadata_,
        "created_at": as_utc(e.created_at).isoformat(),
    } for e, wallet_type in rows]
