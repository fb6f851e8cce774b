"""Erasing a person: their user id becomes a stable pseudonym everywhere, the free text
that producers wrote about them goes, and every amount stays.

The pseudonym is a keyed hash of the user id (HMAC-SHA256 with
``TOKENLEDGER_ERASURE_SECRET``): the same user erased twice gets the same pseudonym, so
erasing is idempotent, and nobody without the secret can link it back. The account keeps
its entries, balances, wallets and keys, so ``verify`` and the reports (statistics per
feature and model, margins, monthly reports) are what they were, under the pseudonym.
The erasure log records who erased which pseudonym and when, never the user id.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from tokenledger.db.sql import statement
from tokenledger.db.uow import UnitOfWork
from tokenledger.errors import AccountNotFound, ConfigurationError, ValidationFailed
from tokenledger.ledger.models import Account
from tokenledger.retention.compaction import claim_account
from tokenledger.retention.models import Erasure
from tokenledger.timeutil import as_utc

PSEUDONYM_PREFIX = "erased-"
# Keys of an event (as published, in a dead letter or a conflict) that carry free text.
FREE_TEXT = ("metadata", "reason")
_PKG = "tokenledger.retention"


@dataclass(frozen=True, slots=True)
class ErasureResult:
    """An erasure: the pseudonym, when and by whom, the rows rewritten, and whether it had
    been done before (then ``rows`` are the first erasure's)."""

    pseudonym: str
    erased_at: datetime
    erased_by: str
    rows: dict[str, int]
    already_erased: bool = False

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["erased_at"] = self.erased_at.isoformat()
        return data


def pseudonym_of(secret: str, user_id: str) -> str:
    """The stable pseudonym of ``user_id`` under ``secret`` (a keyed hash, 128 bits)."""
    digest = hmac.new(secret.encode(), user_id.encode(), hashlib.sha256).hexdigest()
    return PSEUDONYM_PREFIX + digest[:32]


def erase(uow: UnitOfWork, user_id: str, erased_by: str) -> ErasureResult:
    """Replace ``user_id`` by its pseudonym everywhere and drop the free text written about
    it, keeping every amount, in ``uow``. Idempotent: erasing again answers the first
    erasure. Raises AccountNotFound (never erased either), ConfigurationError without a
    secret."""
    secret = uow.settings.erasure_secret
    if secret is None or not secret.get_secret_value():
        raise ConfigurationError("TOKENLEDGER_ERASURE_SECRET: required to erase accounts "
                                 "(the key of the pseudonyms' keyed hash); set it once and "
                                 "keep it")
    if not erased_by.strip():
        raise ValidationFailed("erased_by: name who erases")
    session = uow.session
    pseudonym = pseudonym_of(secret.get_secret_value(), user_id)
    # Locked like every writer locks it: no event for this account commits meanwhile.
    account_id = session.scalar(select(Account.id).where(Account.user_id == user_id)
                                .with_for_update())
    if account_id is None:
        done = session.scalar(select(Erasure).where(Erasure.pseudonym == pseudonym))
        if done is None:
            raise AccountNotFound(user_id)
        return ErasureResult(pseudonym, as_utc(done.erased_at), done.erased_by,
                             dict(done.rows), already_erased=True)
    if session.scalar(select(Erasure.id).where(Erasure.pseudonym == pseudonym)) is not None:
        # Erased, then opened again under the same id: a second person for one pseudonym.
        raise ValidationFailed(f"user_id: {user_id!r} was erased before and opened again; "
                               "its pseudonym is taken (close this account instead)")
    claim_account(uow, account_id)  # no compaction archives its entries meanwhile
    catalog = uow.catalog
    counted = session.execute(statement(_PKG, "erase"), {
        "aid": account_id, "user_id": user_id, "pseudonym": pseudonym,
        "plans": list(catalog.plans), "models": list(catalog.models)}).one()
    rows = {k: int(v) for k, v in counted._mapping.items()}
    rows.update(_erase_documents(session, user_id, pseudonym))
    session.add(Erasure(pseudonym=pseudonym, erased_at=uow.now, erased_by=erased_by[:255],
                        rows=rows))
    session.flush()
    return ErasureResult(pseudonym, uow.now, erased_by[:255], rows)


def erased_document(doc: Any, user_id: str, pseudonym: str) -> Any:
    """``doc`` (JSON) with every object naming ``user_id`` renamed and stripped of its
    free text (``metadata``, ``reason``); everything else as it was."""
    if isinstance(doc, list):
        return [erased_document(item, user_id, pseudonym) for item in doc]
    if not isinstance(doc, dict):
        return doc
    mine = doc.get("user_id") == user_id
    return {k: (pseudonym if mine and k == "user_id"
                else erased_document(v, user_id, pseudonym))
            for k, v in doc.items() if not (mine and k in FREE_TEXT)}


# The small tables whose JSON names users anywhere inside: found by containment or text,
# rewritten here, one row at a time. (table, key column, JSON column, how to find them)
_DOCUMENTS = (
    ("event_conflicts", "id", "payload", "payload @> CAST(:named AS jsonb)"),
    ("renewal_runs", "id", "errors", "errors @> CAST(:listed AS jsonb)"),
    ("renewal_chunks", "id", "errors", "errors @> CAST(:listed AS jsonb)"),
    ("renewal_chunks", "id", "changes", "changes @> CAST(:listed AS jsonb)"),
    ("webhook_deliveries", "id", "payload",
     "event_type = 'renewal_failure_alert' AND payload @> jsonb_build_object("
     "'data', jsonb_build_object('errors', CAST(:listed AS jsonb)))"),
)


def _erase_documents(session: Session, user_id: str, pseudonym: str) -> dict[str, int]:
    named = json.dumps({"user_id": user_id})
    params = {"named": named, "listed": f"[{named}]"}
    counts: dict[str, int] = {}
    for table, key, column, where in _DOCUMENTS:
        rows = session.execute(text(
            f"SELECT {key}, {column} FROM {table} WHERE {where} FOR UPDATE"), params).all()
        for row_id, doc in rows:
            session.execute(text(f"UPDATE {table} SET {column} = CAST(:doc AS jsonb)"
                                 f" WHERE {key} = :id"),
                            {"id": row_id, "doc": json.dumps(
                                erased_document(doc, user_id, pseudonym))})
        counts[f"{table}.{column}"] = len(rows)
    counts["dead_letters"] = _erase_dead_letters(session, user_id, pseudonym)
    stopped = f"error: {user_id}: "  # a stopped run's message (renewals.service)
    counts["renewal_runs.message"] = session.execute(text(
        "UPDATE renewal_runs SET message = replace(message, :old, :new)"
        " WHERE strpos(message, :old) > 0"),
        {"old": stopped, "new": f"error: {pseudonym}: "}).rowcount
    return counts


def _erase_dead_letters(session: Session, user_id: str, pseudonym: str) -> int:
    """Dead letters are kept as the text that arrived (JSON or not)."""
    quoted = json.dumps(user_id)
    rows = session.execute(text(
        "SELECT id, payload FROM dead_letters WHERE strpos(payload, :quoted) > 0"
        " FOR UPDATE"), {"quoted": quoted}).all()
    for row_id, payload in rows:
        try:
            erased = json.dumps(erased_document(json.loads(payload), user_id, pseudonym))
        except ValueError:  # not JSON: the quoted id, wherever it stands
            erased = payload.replace(quoted, json.dumps(pseudonym))
        session.execute(text("UPDATE dead_letters SET payload = :payload WHERE id = :id"),
                        {"id": row_id, "payload": erased})
    return len(rows)
