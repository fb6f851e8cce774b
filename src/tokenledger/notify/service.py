"""Balance notifications: ``balance_changed`` for every committed change, ``balance_low``
once per crossing of the account's threshold (its own, else its plan's) — published only
after the commit.

A writer of balances calls :func:`stage` with its balance changes, inside its unit of
work. That applies the low-balance rule (``sql/low_balance.sql``, the one place it is
written; its state lives in ``low_balance_state``, written in the same transaction, so it
is right across processes and never advances for rolled-back work) and registers the
publishing with ``uow.after_commit``: a rolled-back transaction publishes nothing.

Delivery is at most once (Redis pub/sub has no replay): consumers treat a notice as
"re-read this balance" and keep the highest ``ledger_seq`` per user. Channels are
``<prefix>balance_changed`` and ``<prefix>balance_low``; every message is one JSON object
with an ``event`` field. Python callbacks registered with :func:`subscribe` also run, in
the process that committed.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from json.encoder import encode_basestring_ascii
from typing import TYPE_CHECKING, Any

from sqlalchemy import text

from tokenledger.db.sql import load

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from tokenledger.config import Settings
    from tokenledger.db.uow import UnitOfWork

log = logging.getLogger("tokenledger.notify")

BALANCE_CHANGED = "balance_changed"
BALANCE_LOW = "balance_low"
EVENTS = (BALANCE_CHANGED, BALANCE_LOW)
_ENCODER = json.JSONEncoder(separators=(",", ":"))


@dataclass(slots=True)
class BalanceChange:
    """One account's balance after a committed change, and its plan's threshold."""

    user_id: str
    balance: int
    ledger_seq: int
    threshold: int | None = None


@dataclass(frozen=True, slots=True)
class BalanceNotice:
    """What subscribers receive. ``threshold`` is set for ``balance_low`` only."""

    event: str
    user_id: str
    balance: int
    ledger_seq: int
    threshold: int | None = None

    def to_json(self) -> str:
        return encode_notice(self.event, self.user_id, self.balance, self.ledger_seq,
                             self.threshold)

    @classmethod
    def from_json(cls, raw: str | bytes) -> BalanceNotice:
        data = json.loads(raw)
        return cls(str(data["event"]), str(data["user_id"]), int(data["balance"]),
                   int(data["ledger_seq"]),
                   None if data.get("threshold") is None else int(data["threshold"]))


def encode_notice(event: str, user_id: str, balance: int, seq: int,
                  threshold: int | None = None) -> str:
    """The wire form of a notice: one JSON object, the same for every publisher."""
    tail = "}" if threshold is None else f',"threshold":{int(threshold)}}}'
    return (f'{{"event":"{event}","user_id":{encode_basestring_ascii(user_id)},'
            f'"balance":{int(balance)},"ledger_seq":{int(seq)}{tail}')


@dataclass(frozen=True, slots=True)
class BulkNotices:
    """Many accounts' ``balance_changed`` messages from one set-based writer (a renewal
    slice), encoded once and sent as one string, a line each (JSON never holds a raw
    newline), plus the few ``balance_low`` notices of its crossings."""

    messages: str
    lows: tuple[BalanceNotice, ...] = ()

    @classmethod
    def of(cls, users: Iterable[str], balances: Iterable[int], seqs: Iterable[int],
           lows: Iterable[BalanceNotice] = ()) -> BulkNotices:
        return cls("\n".join(encode_notice(BALANCE_CHANGED, u, b, s)
                             for u, b, s in zip(users, balances, seqs, strict=True)),
                   tuple(lows))

    @property
    def count(self) -> int:
        return self.messages.count("\n") + 1 if self.messages else 0

    def notices(self) -> list[BalanceNotice]:
        """The changes as objects, decoded from the messages."""
        return [BalanceNotice.from_json(line) for line in self.messages.split("\n") if line]


Callback = Callable[[BalanceNotice], Any]

# -- in-process subscribers --------------------------------------------------------------

_subscribers: list[tuple[Callback, frozenset[str]]] = []
_subscribers_lock = threading.Lock()


def subscribe(callback: Callback, events: Iterable[str] = EVENTS) -> Callable[[], None]:
    """Call ``callback`` for every notice committed in this process; returns unsubscribe."""
    entry = (callback, frozenset(events))
    with _subscribers_lock:
        _subscribers.append(entry)

    def unsubscribe() -> None:
        with _subscribers_lock:
            if entry in _subscribers:
                _subscribers.remove(entry)

    return unsubscribe


def dispatch_local(notices: list[BalanceNotice]) -> None:
    """Hand ``notices`` to this process's subscribers (a failing one is logged)."""
    with _subscribers_lock:
        subscribers = list(_subscribers)
    for callback, events in subscribers:
        for notice in notices:
            if notice.event in events:
                try:
                    callback(notice)
                except Exception:  # noqa: BLE001 - a subscriber's bug must not spread
                    log.exception("balance subscriber %r failed", callback)


def has_local_subscribers() -> bool:
    return bool(_subscribers)


def redis_url(settings: Settings) -> str | None:
    """The Redis that carries notifications, or None (in-process subscribers only)."""
    if not settings.notify_enabled:
        return None
    if settings.notify_redis_url:
        return settings.notify_redis_url
    from tokenledger.queue.config import is_redis

    broker = settings.broker()
    return broker if is_redis(broker) else None


def channel(settings: Settings, event_name: str) -> str:
    return f"{settings.notify_channel_prefix}{event_name}"


# -- staging inside a unit of work ---------------------------------------------------------


def low_balance_statement(inputs: str) -> str:
    """A statement applying the low-balance rule to the rows of ``inputs`` (a query of
    user_id, balance, seq, threshold); it answers the user_id and threshold of each
    crossing and, when it wrote webhook deliveries, a row (NULL, how many)."""
    return (f"WITH c AS ({inputs}), {load('tokenledger.notify', 'low_balance')} "
            "SELECT user_id, threshold FROM low"
            " UNION ALL SELECT NULL, count(*) FROM hooks HAVING count(*) > 0")


_LOW_BALANCE = text(low_balance_statement(
    "SELECT * FROM unnest(CAST(:users AS text[]), CAST(:balances AS bigint[]),"
    " CAST(:seqs AS bigint[]), CAST(:thresholds AS bigint[]))"
    " AS c(user_id, balance, seq, threshold)"))


def stage(uow: UnitOfWork, changes: Iterable[BalanceChange]) -> list[BalanceNotice]:
    """Apply the low-balance rule to ``changes`` (accounts this unit of work has locked)
    and publish every notice once it commits. Returns the notices."""
    latest: dict[str, BalanceChange] = {}
    for change in changes:
        prior = latest.get(change.user_id)
        if prior is None or change.ledger_seq > prior.ledger_seq:
            latest[change.user_id] = change
    if not latest:
        return []
    rows = list(latest.values())
    answered = uow.session.execute(_LOW_BALANCE, {
        "users": [c.user_id for c in rows], "balances": [c.balance for c in rows],
        "seqs": [c.ledger_seq for c in rows], "thresholds": [c.threshold for c in rows],
        "now": uow.now}).all()
    crossed = {user: threshold for user, threshold in answered if user is not None}
    notices = [BalanceNotice(BALANCE_CHANGED, c.user_id, c.balance, c.ledger_seq)
               for c in rows]
    notices += [BalanceNotice(BALANCE_LOW, c.user_id, c.balance, c.ledger_seq,
                              crossed[c.user_id])
                for c in rows if c.user_id in crossed]
    publish_after_commit(uow, notices)
    if len(crossed) < len(answered):  # the rule wrote webhook deliveries
        from tokenledger.webhooks import service as webhooks

        webhooks.deliver_after_commit(uow)
    return notices


def publish_after_commit(uow: UnitOfWork, notices: list[BalanceNotice] | BulkNotices,
                         soon: bool = True) -> None:
    """Publish ``notices`` once ``uow`` commits: handed to the background publisher
    (``soon``), or sent before the committing call returns."""
    from tokenledger.notify import publisher

    settings = uow.settings
    if soon:
        uow.after_commit(lambda: publisher.publish_soon(settings, notices))
    else:
        uow.after_commit(lambda: publisher.publish(settings, notices))


def low_notices(users: list[str] | None, balances: list[int] | None, seqs: list[int] | None,
                thresholds: list[int] | None, crossed: Iterable[str] | None
                ) -> list[BalanceNotice]:
    """``balance_low`` notices for the crossings a set-based statement answered."""
    crossed = set(crossed or ())
    return [BalanceNotice(BALANCE_LOW, u, b, s, t)
            for u, b, s, t in zip(users or [], balances or [], seqs or [], thresholds or [],
                                  strict=True) if u in crossed]


# -- per-account thresholds ------------------------------------------------------------------


def set_threshold(session: Session, user_id: str, threshold: int | None,
                  now: datetime) -> int | None:
    """Give the account its own low-balance threshold (None: its plan's again); the rule
    applies it from the account's next balance change. Returns the threshold set.
    Raises AccountNotFound."""
    from sqlalchemy import delete, select
    from sqlalchemy.dialects.postgresql import insert

    from tokenledger.errors import AccountNotFound, ValidationFailed
    from tokenledger.ledger.models import Account
    from tokenledger.notify.models import AccountThreshold

    if threshold is not None and not 0 <= threshold <= 10**15:
        raise ValidationFailed("threshold: must be between 0 and 10^15")
    if session.scalar(select(Account.id).where(Account.user_id == user_id)) is None:
        raise AccountNotFound(user_id)
    if threshold is None:
        session.execute(delete(AccountThreshold).where(AccountThreshold.user_id == user_id))
        return None
    stmt = insert(AccountThreshold).values(user_id=user_id, threshold=threshold, updated_at=now)
    session.execute(stmt.on_conflict_do_update(
        index_elements=["user_id"], set_={"threshold": threshold, "updated_at": now}))
    return threshold
