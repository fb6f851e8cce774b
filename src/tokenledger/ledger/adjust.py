"""Setting an account's balance to an amount (the seed's ``resetBalance``), audited.

An operator's correction is a ledger event like any other: ``ADJUSTMENT`` entries under
the account lock, an event key with a stored outcome (a retried reset answers its first
result), the reason, the previous and new balance and who asked in the entries' metadata,
and a balance notice after commit. Raising the balance credits the STANDARD wallet;
lowering it draws from the wallets in the order charges do. The balance set is the one
``balance`` reads: credits that open holds took are not in it, and come back (or are
charged) when those holds settle.
"""

from __future__ import annotations

import hashlib
import json
import uuid

from tokenledger.db.uow import UnitOfWork
from tokenledger.errors import AccountNotFound, Conflict, ValidationFailed
from tokenledger.ledger.batch import Batch
from tokenledger.ledger.models import STANDARD
from tokenledger.notify import service as notify
from tokenledger.results import EventResult, ResetResult

ADJUST_EVENT = "balance_reset"


def _digest(user_id: str, balance: int, reason: str) -> str:
    blob = json.dumps({"type": ADJUST_EVENT, "user_id": user_id, "balance": balance,
                       "reason": reason}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def reset_balance(uow: UnitOfWork, user_id: str, balance: int, reason: str, *,
                  key: str | None = None, by: str = "sdk") -> ResetResult:
    """Make ``user_id``'s balance ``balance`` with one audited ``ADJUSTMENT`` per wallet
    touched. Raises AccountNotFound, ValidationFailed (negative amount, empty reason) and
    Conflict (the key was used with other arguments)."""
    if balance < 0:
        raise ValidationFailed("balance: must be 0 or more")
    if not reason.strip():
        raise ValidationFailed("reason: an adjustment needs a reason (it is audited)")
    key = key or f"reset:{uuid.uuid4().hex}"
    batch = Batch(uow)
    batch.lock_accounts(user_ids=[user_id])
    account = batch.accounts.get(user_id)
    if account is None:
        raise AccountNotFound(user_id)
    batch.load_outcomes({key})
    digest = _digest(user_id, balance, reason)
    stored = batch.stored.get(key)
    if stored is not None:
        if stored.payload_hash != digest:
            raise Conflict(key, stored.result)
        return ResetResult(**(stored.result or {}))
    now = uow.now
    previous = account.balance(now)
    change = balance - previous
    meta = {"reason": reason, "by": by, "previous_balance": previous, "new_balance": balance}
    if change > 0:
        standard = account.standard() or batch.new_wallet(account, STANDARD, None)
        batch.entry(account, standard, change, "ADJUSTMENT", key, metadata=meta)
    elif change < 0:
        # Positive wallets give what they hold first; an overdrawn STANDARD wallet (a
        # negative balance counts against the total) takes the rest as an overdraft.
        batch.draw(account, -change, key=key, type_="ADJUSTMENT", feature=None,
                   allow_overdraft=True, preferred=None, metadata=meta)
    result = ResetResult(key, user_id, previous, account.balance(now), change, reason)
    batch.store(key, user_id, ADJUST_EVENT, digest,
                EventResult(key, "applied", None, result.as_dict()))
    notify.stage(uow, batch.flush())
    return result
