"""Growing an open hold while its stream runs (``extend``).

A start holds an estimate; a streaming model may run past it. ``extend`` takes more
credits into the same hold, atomically under the account lock, drawing exactly as a start
does: the account row is locked ``FOR UPDATE`` first (``Batch.lock_accounts``, the lock
every writer takes, in id order), then the wallets are read and the credits drawn in
``draw_order`` by the ``allocate`` rule (``Batch.draw``). So extends and starts on one
account serialize on that row and can never hold more than the account has.

Each extension is its own event: its ``HOLD`` entries carry the extension's key, which
gets an ``applied`` outcome row (``verify`` sees them as applied, and a retried extend with
the same key answers its first result). The hold's ``allocations`` grow by what was drawn,
so the one release at the end gives every wallet back what all the hold's draws took.
Extending also moves the hold's expiry to ``now + TTL``: a stream that keeps extending
keeps its hold, one whose producer died stops extending and is released by the expiry
sweep one TTL later.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import timedelta
from decimal import Decimal
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator
from sqlalchemy import exists, select, update

from tokenledger.catalog.pricing import ceil_credits, price_usage, resolve_model
from tokenledger.catalog.service import Catalog, FeatureSpec
from tokenledger.db.uow import UnitOfWork
from tokenledger.errors import Conflict, NotFound
from tokenledger.ledger.batch import Batch, holds_t
from tokenledger.messages import HoldAmount, Id, TokenCount
from tokenledger.notify import service as notify
from tokenledger.results import EXTENDED, HOLD_CLOSED, LIMIT_REACHED, EventResult, ExtendResult
from tokenledger.tokenprocess.models import OPEN, HoldState
from tokenledger.tokenprocess.service import release_expired_holds

EXTEND_EVENT = "token_process_extend"


class ExtendRequest(BaseModel):
    """Grow hold ``hold_id`` ``by`` credits, or ``to_output_tokens`` (the credits that
    many output tokens, after ``input_tokens``, cost with the hold's model)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hold_id: Id
    by: HoldAmount | None = None
    to_output_tokens: TokenCount | None = None
    input_tokens: TokenCount = 0

    @model_validator(mode="after")
    def _one_target(self) -> ExtendRequest:
        if (self.by is None) == (self.to_output_tokens is None):
            raise ValueError("give exactly one of by and to_output_tokens")
        return self

    def digest(self) -> str:
        """Hash of the arguments: an extend key reused with others is a conflict."""
        blob = json.dumps({"type": EXTEND_EVENT, **self.model_dump()}, sort_keys=True,
                          separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


def new_extend_key() -> str:
    """Made once before any try, so a try whose commit is in doubt is answered by the next
    from its stored outcome instead of drawing twice."""
    return f"extend:{uuid.uuid4().hex}"


def covered_output_tokens(catalog: Catalog, feature: FeatureSpec, model: str | None,
                          held: int, input_tokens: int) -> int | None:
    """The most output tokens (after ``input_tokens``) that ``held`` credits pay for, with
    the feature's price; None when output is not what the feature is priced by."""
    chosen = resolve_model(catalog, feature, model) if feature.pricing == "usage" else None
    if chosen is None:
        return None
    spec = catalog.models[chosen]
    if spec.output_weight == 0:
        return None
    margin = 1 + spec.profit_percent / Decimal(100)
    guess = (Decimal(held) / margin * spec.tokens_per_credit
             - input_tokens * spec.input_weight) / spec.output_weight
    out = max(0, ceil_credits(guess))

    def fits(n: int) -> bool:
        return price_usage(catalog, feature, input_tokens, n, chosen).cost <= held

    # The closed form is exact up to rounding; settle the last token by pricing.
    while out > 0 and not fits(out):
        out -= 1
    while fits(out + 1):
        out += 1
    return out if fits(out) else 0


def target(catalog: Catalog, feature: FeatureSpec, hold: HoldState,
           request: ExtendRequest) -> int:
    """The hold's total once extended as asked (never less than it holds now)."""
    if request.by is not None:
        return hold.amount + request.by
    cost = price_usage(catalog, feature, request.input_tokens, request.to_output_tokens or 0,
                       hold.model).cost
    return max(hold.amount, cost)


def extend(uow: UnitOfWork, request: ExtendRequest, key: str | None = None) -> ExtendResult:
    """Grow an open hold under its account's lock, in the caller's unit of work.

    Answers ``extended`` (the new total ``held``), ``limit_reached`` (nothing drawn;
    ``available`` says what could still be taken) or ``closed`` (the hold was settled,
    released or is past its expiry). The same ``key`` and arguments answer the first
    result; other arguments raise Conflict. Raises NotFound for an unknown hold. The
    account's holds past their expiry are released first, as a start does, so they
    neither count against the extend nor can be extended.
    """
    key = key or new_extend_key()
    session, now, catalog = uow.session, uow.now, uow.catalog
    account_id = session.scalar(select(holds_t.c.account_id)
                                .where(holds_t.c.id == request.hold_id))
    if account_id is None:
        raise NotFound(f"hold {request.hold_id} not found")
    batch = _locked(uow, account_id, key, request.hold_id)
    if _has_expired_holds(uow, account_id):
        # As a start does: holds past their expiry stop counting. Released here, under
        # this lock, by the sweep's own code, then the account is read again.
        release_expired_holds(uow, account_ids=[account_id])
        batch = _locked(uow, account_id, key, request.hold_id)
    account = next(iter(batch.accounts.values()))
    hold = batch.holds[request.hold_id]
    digest = request.digest()
    stored = batch.stored.get(key)
    if stored is not None:
        if stored.payload_hash != digest:
            raise Conflict(key, stored.result)
        return ExtendResult.from_dict(stored.result or {}, account.available(now))
    feature = catalog.features.get(hold.feature)
    available = account.available(now)
    if hold.status != OPEN or hold.expires_at <= now or feature is None:
        status = hold.status if hold.status != OPEN else "expired"
        return ExtendResult(HOLD_CLOSED, hold.id, hold.amount, available,
                            reason=f"hold {hold.id} is {status}")
    total = target(catalog, feature, hold, request)
    need = total - hold.amount
    if need > available:
        return ExtendResult(LIMIT_REACHED, hold.id, hold.amount, available, 0,
                            covered_output_tokens(catalog, feature, hold.model, hold.amount,
                                                  request.input_tokens),
                            hold.expires_at, f"{need} more needed, {available} available")
    expires_at = now + timedelta(seconds=uow.settings.hold_ttl_seconds)
    drawn = batch.draw(account, need, key=key, type_="HOLD", feature=hold.feature,
                       allow_overdraft=False, preferred=None,
                       metadata={"hold_id": hold.id, "extends": hold.key}) if need else []
    result = ExtendResult(EXTENDED, hold.id, total, account.available(now), need,
                          covered_output_tokens(catalog, feature, hold.model, total,
                                                request.input_tokens), expires_at)
    batch.store(key, account.user_id, EXTEND_EVENT, digest,
                EventResult(key, "applied", None, result.as_dict()))
    notify.stage(uow, batch.flush())
    session.execute(update(holds_t).where(holds_t.c.id == hold.id).values(
        amount=total, allocations=_merged(hold.allocations, drawn), expires_at=expires_at))
    return result


def _locked(uow: UnitOfWork, account_id: int, key: str, hold_id: int) -> Batch:
    """A batch holding the account's lock, its wallets, the key's outcome and the hold."""
    batch = Batch(uow)
    batch.lock_accounts(account_ids=[account_id])
    batch.load_outcomes({key})
    batch.load_holds({hold_id})
    return batch


def _has_expired_holds(uow: UnitOfWork, account_id: int) -> bool:
    return bool(uow.session.scalar(select(exists().where(
        holds_t.c.account_id == account_id, holds_t.c.status == OPEN,
        holds_t.c.expires_at <= uow.now))))


def _merged(allocations: list[dict[str, Any]], drawn: list[dict[str, Any]]
            ) -> list[dict[str, Any]]:
    """The hold's parts per wallet once ``drawn`` is added (release gives each back)."""
    parts: dict[int, dict[str, Any]] = {p["wallet_id"]: dict(p) for p in allocations}
    for d in drawn:
        part = parts.setdefault(d["wallet_id"], {**d, "amount": 0})
        part["amount"] += d["amount"]
    return list(parts.values())
