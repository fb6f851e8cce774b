"""The two-phase token process: start places a hold, end settles it, expiry releases it.

A hold *debits* the wallets when it is placed (``HOLD`` entries, drawn in the usual
order), so the available balance is simply the wallet balances and two concurrent starts
cannot both spend the same credits: each locks the account row first. Resolving a hold
gives each wallet its held part back (``HOLD_RELEASE``; a wallet that has expired since
gives it to STANDARD, as refunds do) and the end then charges the real cost.

The start is the ledger's one synchronous write, so its latency is the caller's. It is
three reads, the decision in Python, and one write (``sql/``), all taking arrays, so one
set of statements serves one start (:func:`start`, the SDK's path, in a unit of work) or
a group of starts on distinct accounts (the API's pipelined pool, ``pool.StartPool``):

1. lock the accounts ``FOR UPDATE`` in id order (as every writer does), drawing each
   hold's id in the same statement; read their wallets and the stored outcomes of the
   starts' keys (``reads``);
2. :func:`decide` each start under its account's lock (:func:`plan_hold`, then the draw
   rule of ``ledger.wallets.allocate``);
3. :func:`write` the holds, their entries, the balances, the outcome rows and the
   low-balance state in one statement; :func:`finish` reads its answer.
"""

from __future__ import annotations

import json
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from tokenledger.catalog.pricing import Price, estimate_hold, price_usage, resolve_model
from tokenledger.catalog.service import Catalog, FeatureSpec
from tokenledger.db.sql import load, pyformat
from tokenledger.db.uow import UnitOfWork
from tokenledger.errors import AccountNotFound, Conflict, NotFound, ValidationFailed
from tokenledger.ledger.batch import Batch, Rejected, holds_t
from tokenledger.ledger.models import STANDARD
from tokenledger.ledger.wallets import AccountState, WalletState, allocate, draw_order
from tokenledger.messages import StartRequest, TokenProcessEnd
from tokenledger.notify import service as notify
from tokenledger.results import ACCESSIBLE, NOT_ACCESSIBLE, EventResult, StartResult
from tokenledger.timeutil import as_utc
from tokenledger.tokenprocess.models import OPEN, HoldState
from tokenledger.webhooks import service as webhooks

RETURNABLE = "returnable"
INCOMPLETE = "incomplete"
NOT_RETURNABLE = "not-returnable"
# The seed's messages, word for word: clients match on them.
INSUFFICIENT = "Insufficient tokens"
NOT_IN_PACKAGE = "Feature endpoint is not available in your package"
ACCOUNT_CLOSED = "Account is closed"
START_EVENT = "token_process_start"


@dataclass(frozen=True, slots=True)
class HoldPlan:
    """The hold a start is about to place (decided under the account lock)."""

    amount: int
    key: str
    expires_at: datetime
    model: str | None
    metadata: dict[str, Any]  # shared by the hold's entries; the hold id is added later


def plan_hold(catalog: Catalog, plan_code: str, available: int, *, now: datetime,
              user_id: str, feature_endpoint_id: str, max_output_tokens: int | None,
              hold: int | None, model: str | None, key: str | None,
              hold_ttl_seconds: int) -> StartResult | HoldPlan:
    """A start's decision: a refusal in the seed's words, or the hold to place.

    Raises ValidationFailed for what no plan could make right: an unknown feature or
    model, or an explicit hold on a fixed-cost feature (its cost is the hold).
    """
    feature = check_start(catalog, feature_endpoint_id, hold=hold, model=model)
    if not catalog.plan_includes(plan_code, feature_endpoint_id):
        return StartResult(NOT_ACCESSIBLE, available, NOT_IN_PACKAGE, user_id=user_id,
                           feature_endpoint_id=feature_endpoint_id)
    amount = estimate_hold(catalog, feature, max_output_tokens=max_output_tokens, hold=hold,
                           model=model)
    if amount > available:
        return StartResult(NOT_ACCESSIBLE, available, INSUFFICIENT, user_id=user_id,
                           feature_endpoint_id=feature_endpoint_id, required=amount)
    expires_at = now + timedelta(seconds=hold_ttl_seconds)
    chosen = resolve_model(catalog, feature, model) if feature.pricing == "usage" else model
    meta: dict[str, Any] = {"expires_at": expires_at.isoformat()}
    if chosen:
        meta["model"] = chosen
    if max_output_tokens is not None:
        meta["max_output_tokens"] = max_output_tokens
    return HoldPlan(amount, key or f"hold:{uuid.uuid4().hex}", expires_at, chosen, meta)


def check_start(catalog: Catalog, code: str, *, hold: int | None,
                model: str | None) -> FeatureSpec:
    """The start's feature, or ValidationFailed naming the field that cannot be right."""
    feature = catalog.features.get(code)
    if feature is None:
        raise ValidationFailed(f"feature_endpoint_id: unknown feature {code!r}")
    if hold is not None and feature.pricing == "fixed":
        raise ValidationFailed(f"hold: {code!r} has a fixed cost of {feature.cost}, which is "
                               "what its start holds; leave hold out")
    try:
        catalog.check_model(model)
    except ValueError as exc:
        raise ValidationFailed(f"model: {exc}") from None
    return feature


Statement = tuple[str, dict[str, Any]]
Started = tuple[StartResult, list[notify.BalanceNotice]]
_PKG = "tokenledger.tokenprocess"
_ENCODER = json.JSONEncoder(separators=(",", ":"))


def reads(user_ids: list[str], keys: list[str], now: datetime) -> list[Statement]:
    """The statements whose rows :meth:`Locked.of` takes, in this order, in one
    transaction (the stored outcomes only with ``keys``)."""
    out = [(load(_PKG, "lock_accounts"), {"user_ids": user_ids, "now": now}),
           (load(_PKG, "lock_wallets"), {"user_ids": user_ids})]
    if keys:
        out.append((load(_PKG, "stored_starts"), {"keys": keys}))
    return out


@dataclass(slots=True)
class Locked:
    """What the reads answered, by user, account and key."""

    accounts: dict[str, tuple[Any, ...]]
    wallets: dict[int, list[tuple[Any, ...]]]
    stored: dict[str, tuple[Any, ...]]

    @classmethod
    def of(cls, rows: list[list[tuple[Any, ...]]]) -> Locked:
        wallets: dict[int, list[tuple[Any, ...]]] = {}
        for w in rows[1]:
            wallets.setdefault(w[0], []).append(w[1:])
        return cls({a[0]: a[1:] for a in rows[0]}, wallets,
                   {o[0]: o[1:] for o in rows[2]} if len(rows) > 2 else {})


class ExpiredHolds(Exception):  # noqa: N818 - a signal to the caller, not a failure
    """The start's account has open holds past their expiry. They still debit its
    wallets until released, so the caller releases them (``release_expired_holds``, under
    the account lock it holds) and decides again: they stop counting the moment they
    expire, whenever the sweep runs."""

    def __init__(self, account_id: int) -> None:
        super().__init__(account_id)
        self.account_id = account_id


@dataclass(slots=True)
class Decision:
    """What a start does once its reads are in: answer now, or hold and then answer.

    With ``hold`` set, it is one of the starts :func:`write` writes and :func:`finish`
    answers; otherwise ``result`` is the answer and nothing needs to be written.
    """

    result: StartResult
    hold: dict[str, Any] | None = None
    user_id: str = ""
    account_id: int = 0
    balance: int = 0
    draws: list[tuple[int, int, int]] = field(default_factory=list)


def decide(locked: Locked, request: StartRequest, key: str, *, now: datetime,
           hold_ttl_seconds: int, catalog: Catalog) -> Decision:
    """One start's decision from the reads (run under its account's lock).

    Raises AccountNotFound for an unknown user, Conflict for a key stored with other
    arguments (a key stored with the same ones answers its first result), and
    ExpiredHolds when expired holds must be released first.
    """
    user_id = request.user_id
    locked_account = locked.accounts.get(user_id)
    if locked_account is None:
        raise AccountNotFound(user_id)
    account_id, plan_code, timezone, last_renewal_at, closed_at, hold_id, expired = \
        locked_account
    if expired:
        raise ExpiredHolds(account_id)
    account = AccountState(account_id, user_id, plan_code, timezone, as_utc(last_renewal_at))
    account.wallets = [WalletState(w[0], account_id, w[1], w[2], as_utc(w[3]), w[4],
                                   as_utc(w[5]), w[2])
                       for w in locked.wallets.get(account_id, ())]
    available = account.available(now)
    digest = request.digest()
    stored = locked.stored.get(key)
    if stored is not None:
        stored_hash, stored_result = stored
        if stored_hash != digest or not stored_result:
            raise Conflict(key, stored_result)
        return Decision(StartResult.from_stored(stored_result, available))

    if closed_at is not None:
        return Decision(StartResult(NOT_ACCESSIBLE, available, ACCOUNT_CLOSED, user_id=user_id,
                                    feature_endpoint_id=request.feature_endpoint_id))
    decided = plan_hold(catalog, plan_code, available, now=now, user_id=user_id,
                        feature_endpoint_id=request.feature_endpoint_id,
                        max_output_tokens=request.max_output_tokens, hold=request.hold,
                        model=request.model, key=key, hold_ttl_seconds=hold_ttl_seconds)
    if isinstance(decided, StartResult):
        return Decision(decided)
    amount, meta = decided.amount, decided.metadata
    meta["hold_id"] = hold_id
    order = draw_order(account, catalog, now, None) if amount else []
    taken, owed = allocate(order, amount)
    assert owed == 0, (amount, available)  # plan_hold refused more than is available
    draws: list[tuple[int, int, int]] = []  # (wallet id, taken, balance before)
    allocations: list[dict[str, Any]] = []
    for wallet, take in taken:
        draws.append((wallet.id, take, wallet.balance))
        wallet.balance -= take
        allocations.append({"wallet_id": wallet.id, "wallet_type": wallet.wallet_type,
                            "amount": take})
    result = StartResult(ACCESSIBLE, account.available(now), None, hold_id, user_id,
                         request.feature_endpoint_id, amount, None, decided.expires_at)
    plan = catalog.plans.get(plan_code)
    balance = account.balance(now)
    # The outcome row makes the hold key a first-class event key: verify sees its entries
    # as applied, and a retried start with the same key finds its answer there.
    row = {"id": hold_id, "key": decided.key, "account_id": account_id, "user_id": user_id,
           "feature": request.feature_endpoint_id, "model": decided.model, "amount": amount,
           "allocations": allocations, "expires_at": decided.expires_at.isoformat(),
           "meta": meta, "digest": digest, "result": result.as_dict(), "balance": balance,
           "threshold": plan.low_balance_threshold if plan else None}
    return Decision(result, row, user_id, account_id, balance, draws)


def write(decisions: list[Decision], now: datetime) -> Statement | None:
    """The one statement writing the holds of ``decisions`` (on distinct accounts; those
    without a hold are skipped), or None when none holds."""
    holding = [d for d in decisions if d.hold is not None]
    if not holding:
        return None
    if len({d.account_id for d in holding}) < len(holding):
        # Each decision drew from its account's balance as read: two on one account would
        # both have drawn from the same balance (the statement also pairs entries with
        # holds by account).
        raise ValueError("one write holds at most once per account")
    drawn = [(d.account_id, *draw) for d in holding for draw in d.draws]
    accounts, wallets, taken, before = zip(*drawn, strict=True) if drawn else ((),) * 4
    params: dict[str, Any] = {
        "holds": _ENCODER.encode([d.hold for d in holding]), "now": now,
        "event": START_EVENT, "draw_accounts": _int_array(accounts),
        "draw_wallets": _int_array(wallets), "draw_taken": _int_array(taken),
        "draw_before": _int_array(before)}
    return load(_PKG, "write_holds"), params


def _int_array(values: tuple[int, ...]) -> str:
    """A PostgreSQL array literal of integers (nothing to quote)."""
    return "{" + ",".join(map(str, values)) + "}"


def finish(decisions: list[Decision], rows: list[tuple[Any, ...]]) -> list[Started]:
    """(result, notices to publish once committed) of each decision, given the rows
    :func:`write`'s statement answered (none when it was not needed)."""
    seqs = {row[0]: row[1] for row in rows if row[0] is not None}
    crossed = {row[2]: row[1] for row in rows if row[2] is not None}  # user -> threshold
    out: list[Started] = []
    for d in decisions:
        seq = seqs.get(d.account_id) if d.hold is not None else None
        if seq is None:  # nothing written, or nothing drawn (a free feature)
            out.append((d.result, []))
            continue
        notices = [notify.BalanceNotice(notify.BALANCE_CHANGED, d.user_id, d.balance, seq)]
        if d.user_id in crossed:
            notices.append(notify.BalanceNotice(notify.BALANCE_LOW, d.user_id, d.balance, seq,
                                                crossed[d.user_id]))
        out.append((d.result, notices))
    return out


def webhooks_written(rows: list[tuple[Any, ...]]) -> bool:
    """Whether :func:`write`'s statement (its answered ``rows``) recorded webhook deliveries."""
    return any(row[0] is None and row[2] is None for row in rows)


def start(uow: UnitOfWork, request: StartRequest, key: str | None = None) -> StartResult:
    """Check access and balance and place the hold, atomically under the account lock, in
    the caller's unit of work; the notices are published once it commits.

    Concurrent starts on one account serialize on its row, so their holds never add up to
    more than the balance. The same ``key`` and arguments return the first answer, other
    arguments raise Conflict. Raises AccountNotFound for an unknown user.
    """
    key = key or new_hold_key()
    raw = uow.session.connection().connection.driver_connection

    def decide_locked() -> Decision:
        rows = [raw.execute(pyformat(sql), params).fetchall()
                for sql, params in reads([request.user_id], [key], uow.now)]
        return decide(Locked.of(rows), request, key, now=uow.now,
                      hold_ttl_seconds=uow.settings.hold_ttl_seconds, catalog=uow.catalog)

    try:
        decision = decide_locked()
    except ExpiredHolds as due:
        release_expired_holds(uow, account_ids=[due.account_id])
        decision = decide_locked()
    statement = write([decision], uow.now)
    written = raw.execute(pyformat(statement[0]), statement[1]).fetchall() \
        if statement is not None else []
    result, notices = finish([decision], written)[0]
    notify.publish_after_commit(uow, notices, soon=False)
    if webhooks_written(written):
        webhooks.deliver_after_commit(uow)
    return result


def new_hold_key() -> str:
    """A start's hold key when the caller gave none: made once, before any try, so a try
    whose commit is in doubt is found by the next one instead of holding twice."""
    return f"hold:{uuid.uuid4().hex}"


# -- releasing a hold ---------------------------------------------------------------------


def release(batch: Batch, account: AccountState, hold: HoldState, status: str,
            resolved_by: str | None) -> list[dict[str, Any]]:
    """Give each wallet its held part back and mark the hold resolved (in this batch).

    A wallet that is no longer live gets nothing back: its part goes to STANDARD, as
    refunds do. The entries carry the hold's key, so the ledger's unique (event key,
    wallet, type) refuses a second release of the same hold.
    """
    assert hold.status == OPEN, hold
    now = batch.now
    by_id = {w.id: w for w in account.wallets}
    targets: dict[int, int] = defaultdict(int)
    standard: WalletState | None = None
    for part in hold.allocations:
        wallet = by_id.get(part["wallet_id"])
        if wallet is None or not wallet.live(now):
            standard = standard or account.standard() or batch.new_wallet(account, STANDARD,
                                                                          None)
            by_id[standard.id] = standard
            wallet = standard
        targets[wallet.id] += part["amount"]
    meta = {"hold_id": hold.id, "resolution": status}
    returned = []
    for wallet_id, amount in targets.items():
        if amount:
            wallet = by_id[wallet_id]
            batch.entry(account, wallet, amount, "HOLD_RELEASE", hold.key, hold.feature,
                        reference=resolved_by, metadata=meta)
            returned.append({"wallet_id": wallet_id, "wallet_type": wallet.wallet_type,
                             "amount": amount})
    hold.status = status
    hold.resolved_by = resolved_by
    batch.hold_updates.append({"_id": hold.id, "_status": status, "_at": now,
                               "_by": resolved_by})
    return returned


def _hold_first(batch: Batch, account: AccountState, hold: HoldState | None
                ) -> list[WalletState] | None:
    """Draw order for settling: the hold's own wallets first, then the usual order."""
    if hold is None:
        return None
    now = batch.now
    usual = draw_order(account, batch.uow.catalog, now, None)
    held = {p["wallet_id"] for p in hold.allocations}
    return [w for w in usual if w.id in held] + [w for w in usual if w.id not in held]


def incomplete_price(feature: FeatureSpec, hold: HoldState | None) -> Price:
    """What an end whose provider reported no usage costs, by the feature's catalog rule.

    ``charge_hold`` (the default): what the live hold set aside, since the user may well
    have received what the stream produced before it broke off, and the hold is the best
    estimate there is; ``release``: nothing. Without a live hold (none was placed, or it
    expired first) there is nothing to charge from.
    """
    cost = hold.amount if hold is not None and feature.on_incomplete == "charge_hold" else 0
    return Price(cost, Decimal(cost), hold.model if hold else None)


# -- end ----------------------------------------------------------------------------------


def _only_open_hold(batch: Batch, account: AccountState, feature: str) -> int | None:
    """The hold an end without a hold id settles: the account's one open, unexpired hold
    for ``feature`` (None: there is none), as this batch sees it (``load_open_holds``).
    With several, which one is meant is a guess: rejected, naming them."""
    ids = sorted(h.id for h in batch.holds.values()
                 if h.account_id == account.id and h.feature == feature and h.status == OPEN
                 and h.expires_at > batch.now)
    if len(ids) > 1:
        raise Rejected(f"{len(ids)} open holds for feature {feature!r}: "
                       f"{', '.join(f'#{i}' for i in ids)}; name one with hold_id")
    return ids[0] if ids else None


def end(batch: Batch, account: AccountState, event: TokenProcessEnd) -> EventResult:
    """Apply a token_process_end: price the usage, settle the hold, store the outcome.

    With an open hold: release it, then charge the real cost, the hold's wallets first.
    A cost above what is available follows the feature's overdraft policy: with overdraft
    STANDARD goes negative; without, what is available is charged and the rest recorded as
    ``unpaid``. Either way the status is ``not-returnable`` and the shortfall is stored.
    Both counts 0 release the hold and charge nothing. An end without reported usage
    (``usage_reported`` false) settles by the feature's ``on_incomplete`` rule
    (:func:`incomplete_price`) and its outcome says ``incomplete``. Without a hold id, the
    account's one open hold for the feature is the end's (several: rejected, naming them).
    An end naming another account's hold, an unknown one or one already settled is
    rejected; a hold that expired first is ignored (its credits went back) and the usage is
    charged as if there were none.
    """
    now = batch.now
    catalog = batch.uow.catalog
    code = event.feature_endpoint_id
    try:
        catalog.check_model(event.model)
    except ValueError as exc:
        raise Rejected(str(exc)) from None
    hold: HoldState | None = None
    hold_note: str | None = None
    hold_id = event.hold_id if event.hold_id is not None else _only_open_hold(batch, account,
                                                                               code)
    if hold_id is not None:
        hold = batch.holds.get(hold_id)
        if hold is None or hold.account_id != account.id:
            raise Rejected(f"hold {hold_id} not found for this account")
        if hold.feature != code:
            raise Rejected(f"hold {hold.id} was placed for feature {hold.feature!r}, "
                          f"not {code!r}")
        if hold.status in ("settled", "released"):
            by = f" by {hold.resolved_by!r}" if hold.resolved_by else ""
            raise Rejected(f"hold {hold.id} was already {hold.status}{by}")
        if hold.status == "expired":
            hold_note, hold = "expired", None
    feature = catalog.features.get(code)
    if feature is None:
        raise Rejected(f"unknown feature {code!r}")
    # A live hold proves the start's access check; without one, check it now.
    if hold is None and account.closed_at is not None:
        raise Rejected(f"account {account.user_id!r} is closed")
    if hold is None and not catalog.plan_includes(account.plan_code, code):
        raise Rejected(NOT_IN_PACKAGE)

    price = price_usage(catalog, feature, event.input_tokens, event.output_tokens,
                        event.model or (hold.model if hold else None))
    if not event.usage_reported:
        price = incomplete_price(feature, hold)
    released: list[dict[str, Any]] = []
    if hold is not None:
        released = release(batch, account, hold, "settled" if price.cost else "released",
                           event.key)
    cost = price.cost
    available = account.available(now)
    shortfall = max(0, cost - available)
    take = cost if feature.allow_overdraft else min(cost, available)
    touched: list[dict[str, Any]] = []
    if take:
        meta = {**(event.metadata or {}), **price.metadata(),
                "input_tokens": event.input_tokens, "output_tokens": event.output_tokens}
        if hold_id is not None:
            meta["hold_id"] = hold_id
        if shortfall:
            meta["shortfall"] = shortfall
        touched = batch.draw(account, take, key=event.key, type_="CHARGE", feature=code,
                       allow_overdraft=feature.allow_overdraft, preferred=None,
                       metadata=meta, order=_hold_first(batch, account, hold))
        # A refund of this end (by its key) in the same batch finds what it charged.
        batch.charged[event.key] = defaultdict(int, {t["wallet_id"]: t["amount"]
                                                     for t in touched})
        batch.charge_owner[event.key] = account.id
    data: dict[str, Any] = {
        "user_id": account.user_id,
        "token": account.balance(now),
        "cost": cost,
        "status": NOT_RETURNABLE if shortfall else RETURNABLE,
        "charged": take,
        "input_tokens": event.input_tokens,
        "output_tokens": event.output_tokens,
        "exact_cost": price.metadata()["exact_cost"],
        "wallets": touched,
    }
    if price.model is not None:
        data["model"] = price.model
    if hold_id is not None:
        data["hold_id"] = hold_id
        data["hold"] = hold_note or (hold.status if hold else None)
        data["released"] = sum(r["amount"] for r in released)
    if not event.usage_reported:
        data["outcome"] = INCOMPLETE
        data["on_incomplete"] = feature.on_incomplete
    if shortfall:
        data["shortfall"] = shortfall
        data["unpaid"] = cost - take
        data["overdraft"] = feature.allow_overdraft
        data["message"] = (f"{INSUFFICIENT}: the cost {cost} exceeded the available "
                           f"{available} by {shortfall}"
                           + ("; the STANDARD wallet went negative" if feature.allow_overdraft
                              else f"; {shortfall} could not be charged"))
    return EventResult(event.key, "applied", None, data)


# -- expiry -------------------------------------------------------------------------------


@dataclass(slots=True)
class ExpiryReport:
    """What one expiry pass did."""

    holds: int = 0
    accounts: int = 0
    credits: int = 0


def release_expired_holds(uow: UnitOfWork, *, limit: int = 1000,
                          account_ids: list[int] | None = None) -> ExpiryReport:
    """Release open holds past ``expires_at`` for up to ``limit`` accounts (or just the
    given ones), each once; their notices are published once the unit of work commits.

    Safe to run twice or concurrently: accounts are locked in id order before their holds
    are re-read, so a hold that another pass (or an end) resolved meanwhile is skipped.
    Each expiry is announced (``hold_expired``) in the same transaction.
    Returns fewer than ``limit`` accounts when nothing more is due.
    """
    session, now = uow.session, uow.now
    if account_ids is None:
        account_ids = list(session.scalars(
            select(holds_t.c.account_id).where(holds_t.c.status == OPEN,
                                               holds_t.c.expires_at <= now)
            .group_by(holds_t.c.account_id).order_by(holds_t.c.account_id).limit(limit)))
    report = ExpiryReport(accounts=len(account_ids))
    if not account_ids:
        return report
    batch = Batch(uow)
    batch.lock_accounts(account_ids=account_ids)
    by_id = {a.id: a for a in batch.accounts.values()}
    expired: list[webhooks.WebhookEvent] = []
    for row in session.execute(
        select(holds_t).where(holds_t.c.account_id.in_(account_ids),
                              holds_t.c.status == OPEN, holds_t.c.expires_at <= now)
        .order_by(holds_t.c.account_id, holds_t.c.id)
    ):
        hold = HoldState.from_row(row)
        account = by_id[hold.account_id]
        returned = release(batch, account, hold, "expired", None)
        report.holds += 1
        report.credits += sum(r["amount"] for r in returned)
        expired.append(webhooks.WebhookEvent(
            "hold_expired", account.user_id,
            {"user_id": account.user_id, "hold_id": hold.id, "feature": hold.feature,
             "amount": hold.amount, "returned": returned,
             "expires_at": hold.expires_at.isoformat(), "released_at": now.isoformat()},
            f"hold_expired:{hold.id}"))
    notify.stage(uow, batch.flush())
    webhooks.record(uow, expired)
    return report


def open_holds(session: Session, user_id: str | None = None, *, status: str | None = OPEN,
               limit: int = 100) -> list[dict[str, Any]]:
    """Holds, newest first, optionally of one user and one status (read-only)."""
    query = select(holds_t)
    if user_id is not None:
        query = query.where(holds_t.c.user_id == user_id)
    if status is not None:
        query = query.where(holds_t.c.status == status)
    rows = session.execute(query.order_by(holds_t.c.id.desc()).limit(limit))
    return [_hold_row(r) for r in rows]


def find_hold(session: Session, hold_id: int) -> dict[str, Any]:
    """One hold by id, as ``open_holds`` shows it; NotFound when there is none."""
    row = session.execute(select(holds_t).where(holds_t.c.id == hold_id)).first()
    if row is None:
        raise NotFound(f"no hold #{hold_id} (`tokenledger holds list` shows the open ones)")
    return _hold_row(row)


def _hold_row(r: Any) -> dict[str, Any]:
    return {
        "id": r.id, "user_id": r.user_id, "feature": r.feature, "model": r.model,
        "amount": r.amount, "status": r.status, "allocations": r.allocations,
        "created_at": as_utc(r.created_at).isoformat(),
        "expires_at": as_utc(r.expires_at).isoformat(),
        "resolved_at": as_utc(r.resolved_at).isoformat() if r.resolved_at else None,
        "resolved_by": r.resolved_by,
    }
