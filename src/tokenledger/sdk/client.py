"""The Python SDK: publish events to the workers, start token processes, read outcomes and
balances."""

from __future__ import annotations

import functools
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from tokenledger.config import Settings, settings_from_env
from tokenledger.errors import (
    AccountExists,
    AccountNotFound,
    Conflict,
    ResultTimeout,
    TokenLedgerError,
    ValidationFailed,
    as_ledger_error,
)
from tokenledger.messages import (
    MAX_BATCH,
    AnyEvent,
    Event,
    Key,
    StartRequest,
    When,
    describe,
    validated,
)
from tokenledger.results import Balance, EventResult, StartResult, balance_at_of, balance_of
from tokenledger.sdk.holds import HoldMethods
from tokenledger.sdk.process import TokenProcess
from tokenledger.sdk.reads import ReadMethods
from tokenledger.sdk.stream import StreamingProcess
from tokenledger.timeutil import utcnow

if TYPE_CHECKING:
    from tokenledger.dashboard.links import DashboardLink
    from tokenledger.ledger.plans import PlanChange
    from tokenledger.notify.service import BalanceNotice
    from tokenledger.queue.producer import Producer
    from tokenledger.retention.erasure import ErasureResult

# What a client needs for publishing and reading is imported here; the ORM, Celery and
# the domain's writers load on first use (a CLI read like `tokenledger balance` never
# needs them).
_event: TypeAdapter[Any] = TypeAdapter(Event)
REMEMBERED = 100_000  # keys a client remembers publishing, to read their results truly


def _ledger_errors(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` raising only tokenledger's errors: a failure of a library underneath
    (SQLAlchemy, psycopg, kombu, redis) becomes the matching one, the original chained."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except TokenLedgerError:
            raise
        except Exception as exc:  # noqa: BLE001 - translated, with the cause chained
            raise as_ledger_error(exc) from exc

    return wrapper


def new_key() -> str:
    return str(uuid.uuid4())


def build_event(data: dict[str, Any] | AnyEvent) -> AnyEvent:
    """Validate an event given as a dict (a key is made when missing) or a model."""
    if not isinstance(data, dict):
        return data
    data = {"key": new_key(), **data}
    try:
        return _event.validate_python(data)
    except ValidationError as exc:
        raise ValidationFailed(describe(exc)) from None


class LedgerClient(HoldMethods, ReadMethods):
    """Publish events to the workers and read what they did.

    Publishing methods validate locally (a bad field raises ValidationFailed naming it)
    and return the event key; ``result(key)`` waits for the stored outcome.
    """

    def __init__(self, settings: Settings | None = None, *, linger_ms: float = 0) -> None:
        self.settings = settings or settings_from_env()
        self.linger_ms = linger_ms
        self._producer: Producer | None = None
        self._lock = threading.Lock()
        # What this client published, per key (bounded): the payload hash and the message
        # that carried it, so result() can tell a conflict or a replay from its own apply.
        self._sent: OrderedDict[str, tuple[str, str | None]] = OrderedDict()

    @property
    def producer(self) -> Producer:
        """The client's producer (one connection, made on first publish)."""
        if self._producer is None:
            with self._lock:
                if self._producer is None:
                    from tokenledger.queue.producer import Producer

                    self._producer = Producer(self.settings, linger_ms=self.linger_ms)
        return self._producer

    # -- publishing ----------------------------------------------------------------------

    def _remember(self, models: list[AnyEvent], message_id: str | None) -> None:
        with self._lock:
            for model in models:
                self._sent[model.key] = (model.payload_hash(), message_id)
                self._sent.move_to_end(model.key)
            while len(self._sent) > REMEMBERED:
                self._sent.popitem(last=False)

    @_ledger_errors
    def publish(self, event: dict[str, Any] | AnyEvent) -> str:
        """Publish one event; returns its key once the event is in the broker (with
        ``linger_ms``: once it is buffered; see ``flush``). Events published at the same
        moment from several threads share one message."""
        model = build_event(event)
        message_id = self.producer.publish_event(model.to_message())
        self._remember([model], message_id)
        return model.key

    @_ledger_errors
    def publish_many(self, events: Iterable[dict[str, Any] | AnyEvent]) -> list[str]:
        """Validate all, then publish in messages of up to 1,000 events; returns the keys."""
        models = [build_event(e) for e in events]
        for start in range(0, len(models), MAX_BATCH):
            chunk = models[start:start + MAX_BATCH]
            message_id = self.producer.publish_events([m.to_message() for m in chunk])
            self._remember(chunk, message_id)
        return [m.key for m in models]

    @_ledger_errors
    def flush(self, timeout: float | None = None) -> None:
        """With ``linger_ms``: wait until every event published so far is in the broker."""
        if self._producer is not None:
            self._producer.flush(timeout)

    @_ledger_errors
    def charge(self, user_id: str, feature: str | None = None, amount: int | None = None,
               key: str | None = None, metadata: dict[str, Any] | None = None,
               allow_overdraft: bool = False, preferred_wallet_type: str | None = None) -> str:
        """Charge by feature (its catalog cost) or by amount; returns the event key."""
        return self.publish(event_fields(type="charge", user_id=user_id, feature=feature,
                                     amount=amount, key=key, metadata=metadata,
                                     allow_overdraft=allow_overdraft,
                                     preferred_wallet_type=preferred_wallet_type))

    @_ledger_errors
    def credit(self, user_id: str, amount: int, wallet_type: str = "PREMIUM",
               expires_at: datetime | None = None, key: str | None = None,
               reason: str | None = None, metadata: dict[str, Any] | None = None) -> str:
        """Add credits to a wallet of ``wallet_type``; returns the event key."""
        return self.publish(event_fields(type="credit", user_id=user_id, amount=amount,
                                     wallet_type=wallet_type, expires_at=expires_at, key=key,
                                     reason=reason, metadata=metadata))

    @_ledger_errors
    def refund(self, user_id: str, original_key: str, amount: int | None = None,
               key: str | None = None, reason: str | None = None) -> str:
        """Give back (part of) a charge to the wallets it came from; returns the event key."""
        return self.publish(event_fields(type="refund", user_id=user_id, original_key=original_key,
                                     amount=amount, key=key, reason=reason))

    @_ledger_errors
    def token_process_end(self, user_id: str, feature_endpoint_id: str, input_tokens: int,
                          output_tokens: int, model: str | None = None,
                          hold_id: int | None = None, key: str | None = None,
                          metadata: dict[str, Any] | None = None,
                          usage_reported: bool = True) -> str:
        """Report a token process's usage: the worker prices it, settles the hold and
        stores ``{user_id, token, cost, status}``; returns the event key. With
        ``usage_reported=False`` (the provider reported nothing) the feature's
        ``on_incomplete`` rule settles it and the outcome says ``incomplete``."""
        return self.publish(event_fields(type="token_process_end", user_id=user_id,
                                     feature_endpoint_id=feature_endpoint_id,
                                     input_tokens=input_tokens, output_tokens=output_tokens,
                                     model=model, hold_id=hold_id, key=key,
                                     metadata=metadata,
                                     usage_reported=None if usage_reported else False))

    # -- synchronous ---------------------------------------------------------------------

    @_ledger_errors
    def token_process_start(self, user_id: str, feature_endpoint_id: str,
                            max_output_tokens: int | None = None, hold: int | None = None,
                            model: str | None = None, key: str | None = None) -> StartResult:
        """Check the feature and the balance and place a hold, in one transaction.

        Returns ``accessible`` with a ``hold_id``, or ``not-accessible`` with the seed's
        message. With a ``key``, a retried start returns the first answer.
        Raises AccountNotFound for an unknown user, ValidationFailed for bad numbers.
        """
        from tokenledger.db.errors import QUICK
        from tokenledger.db.uow import unit_of_work
        from tokenledger.tokenprocess import service as token_process

        request = validated(StartRequest, event_fields(
            user_id=user_id, feature_endpoint_id=feature_endpoint_id,
            max_output_tokens=max_output_tokens, hold=hold, model=model))
        if key is not None:
            validated(_KeyOnly, {"key": key})
        # One hold key for every try, so a try whose commit is in doubt is answered from
        # its stored outcome by the next one instead of holding twice.
        key = key or token_process.new_hold_key()

        def once() -> StartResult:
            with unit_of_work(self.settings) as uow:
                return token_process.start(uow, request, key)

        return QUICK.run(once)

    def token_process(self, user_id: str | Callable[..., str], feature_endpoint_id: str, *,
                      max_output_tokens: int | None = None, hold: int | None = None,
                      model: str | None = None, stream: bool = False,
                      **stream_options: Any) -> TokenProcess | StreamingProcess:
        """start → your code → end, as a context manager (``with ... as usage``) or a
        decorator (the seed's withTokenProcess; ``user_id`` may be a function of the
        call's arguments). Not accessible raises FeatureNotAccessible; if your code
        raises, the hold is released (nothing charged) and the exception propagates.

        ``stream=True``: the streaming form (``sdk/stream.py``; options ``input_tokens``,
        ``step``, ``raise_on_limit``, ``metadata``): feed ``add_output(n)`` per chunk; the
        hold grows ahead of the stream, stops it at the balance, and settles once."""
        if stream:
            return StreamingProcess(self, user_id, feature_endpoint_id, model=model,
                                    **stream_options)
        return TokenProcess(self, user_id, feature_endpoint_id,
                            max_output_tokens=max_output_tokens, hold=hold, model=model)

    @_ledger_errors
    def open_account(self, user_id: str, plan: str | None = None, timezone: str | None = None,
                     key: str | None = None) -> str:
        """Open an account now (idempotent per key, default ``open:<user_id>``). Opening
        it again with another plan raises AccountExists naming the plan it has."""
        from tokenledger.db.errors import QUICK
        from tokenledger.db.uow import unit_of_work
        from tokenledger.ledger.service import apply_events

        event = build_event(event_fields(type="open_account", user_id=user_id, plan=plan,
                                         timezone=timezone, key=key or f"open:{user_id}"))

        def once() -> EventResult:
            with unit_of_work(self.settings) as uow:
                if plan is not None:
                    # Refused before it is recorded, so the key stays free for the retry.
                    try:
                        uow.catalog.check_plan(plan)
                    except ValueError as exc:
                        raise ValidationFailed(f"plan: {exc}") from None
                return apply_events(uow, [event]).results[0]

        outcome = QUICK.run(once)
        exists = outcome.status == "conflict" or outcome.reason == "account already exists"
        refused = outcome.status == "rejected" or (
            outcome.status == "duplicate" and outcome.data.get("outcome") == "rejected")
        if refused and not exists:
            raise ValidationFailed(f"plan: {outcome.reason}")
        if exists:
            try:
                current = self.balance(user_id).plan
            except AccountNotFound:
                # The key opened nothing (its first use was refused) and now carries
                # another payload: say so rather than "not found".
                raise Conflict(event.key) from None
            if plan is not None and plan != current:
                raise AccountExists(user_id, current)
        return event.key

    @_ledger_errors
    def change_plan(self, user_id: str, plan: str) -> PlanChange:
        """Move the account to ``plan`` (no credits move: the new plan applies from its
        next reset or renewal). Raises ValidationFailed naming the plans, AccountNotFound."""
        from tokenledger.db.uow import unit_of_work
        from tokenledger.ledger.plans import change_plan

        with unit_of_work(self.settings) as uow:
            return change_plan(uow, user_id, plan)

    @_ledger_errors
    def close_account(self, user_id: str) -> datetime:
        """Close the account: charges and starts are refused by name from then on; every
        row stays. Returns when it was closed (the first time, when run twice)."""
        from tokenledger.db.uow import unit_of_work
        from tokenledger.ledger.plans import close_account

        with unit_of_work(self.settings) as uow:
            return close_account(uow, user_id)

    @_ledger_errors
    def result(self, key: str, timeout: float | None = None) -> EventResult:
        """The stored outcome of ``key``; with a timeout, wait for it (ResultTimeout)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.005
        while True:
            found = self._lookup(key)
            if found is not None:
                return found
            if deadline is None:
                return EventResult(key, "pending")
            if time.monotonic() >= deadline:
                raise ResultTimeout(f"no outcome for key {key!r} after {timeout}s")
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 0.1)

    def _lookup(self, key: str) -> EventResult | None:
        from tokenledger.db.direct import fetch

        rows = fetch(self.settings, "tokenledger.ledger", "outcome", {"key": key})
        if not rows:
            return None
        _, outcome, reason, result, stored_hash, stored_by = rows[0]
        stored = EventResult(key, outcome, reason, result or {})
        with self._lock:
            sent = self._sent.get(key)
        if sent is None or stored_hash is None:
            return stored  # not published by this client (or dead-lettered)
        sent_hash, sent_by = sent
        if stored_hash != sent_hash:
            return EventResult(
                key, "conflict", f"key {key!r} was first used with another payload; this "
                "publish was not applied", {}, stored=stored)
        if stored_by is None or sent_by is None:
            return stored
        return EventResult(key, outcome, reason, result or {}, replay=stored_by != sent_by)

    @_ledger_errors
    def balance(self, user_id: str, at: datetime | None = None) -> Balance:
        """The account's total over live wallets, and each wallet; with ``at``, as of that
        moment (every entry dated before it), answered from the ledger, with what holds
        open then had taken (``held``, per wallet too). Raises AccountNotFound, and
        ValidationFailed for an ``at`` before the retention cut-off."""
        from tokenledger.db.direct import fetch

        if at is None:
            rows = fetch(self.settings, "tokenledger.ledger", "balance",
                         {"user_id": user_id, "now": utcnow()})
            return balance_of(user_id, rows)
        when = validated(_At, {"at": at}).at
        rows = fetch(self.settings, "tokenledger.ledger", "balance_at",
                     {"user_id": user_id, "at": when})
        return balance_at_of(user_id, when, rows)

    @_ledger_errors
    def erase_account(self, user_id: str, erased_by: str = "sdk") -> ErasureResult:
        """Erase a person: ``user_id`` becomes a stable pseudonym everywhere, free-text
        metadata goes, every amount stays (needs TOKENLEDGER_ERASURE_SECRET). Idempotent:
        erasing again answers the first erasure. Raises AccountNotFound."""
        from tokenledger.db.errors import QUICK
        from tokenledger.db.uow import unit_of_work
        from tokenledger.retention.erasure import erase

        def once() -> ErasureResult:
            with unit_of_work(self.settings) as uow:
                return erase(uow, user_id, erased_by)

        return QUICK.run(once)

    @_ledger_errors
    def set_low_balance_threshold(self, user_id: str, threshold: int | None) -> None:
        """Alert (``balance_low``) when this account falls to ``threshold`` or below,
        instead of its plan's threshold (None: the plan's again)."""
        from tokenledger.db.uow import unit_of_work
        from tokenledger.notify.service import set_threshold

        with unit_of_work(self.settings) as uow:
            set_threshold(uow.session, user_id, threshold, uow.now)

    @_ledger_errors
    def dashboard_link(self, user_id: str, ttl_seconds: int = 900,
                       base_url: str | None = None) -> DashboardLink:
        """A signed link to ``user_id``'s read-only dashboard, valid for ``ttl_seconds``
        (at most 7 days), with ``.url``, ``.expires_at`` and ``.badge_html``. Signed here
        with ``TOKENLEDGER_DASHBOARD_SECRET`` (the API's own); the URL starts with
        ``base_url``, else ``TOKENLEDGER_DASHBOARD_URL``. AccountNotFound for an unknown
        user; DashboardDisabled without the secret."""
        from tokenledger.dashboard.links import mint

        self.balance(user_id)  # the account must exist
        return mint(self.settings, user_id, utcnow(), ttl_seconds, base_url)

    # -- balance notifications -------------------------------------------------------------

    def on_balance_changed(self, callback: Callable[[BalanceNotice], Any]
                           ) -> Callable[[BalanceNotice], Any]:
        """Call ``callback(notice)`` after every committed balance change (user_id, balance,
        ledger_seq), newest ledger_seq per user only. With Redis, changes committed by any
        process; with the embedded broker, only those committed in this process. Returns
        the callback (usable as a decorator); subscribed when it returns."""
        self._subscribe(callback, ("balance_changed",))
        return callback

    def on_balance_low(self, callback: Callable[[BalanceNotice], Any]
                       ) -> Callable[[BalanceNotice], Any]:
        """Call ``callback(notice)`` once each time an account falls to or below its plan's
        low-balance threshold (``notice.threshold``); re-armed when it goes back above."""
        self._subscribe(callback, ("balance_low",))
        return callback

    def _subscribe(self, callback: Callable[[BalanceNotice], Any],
                   events: tuple[str, ...]) -> None:
        from tokenledger.notify.service import redis_url, subscribe
        from tokenledger.notify.subscriber import RedisSubscriber

        url = redis_url(self.settings)
        if url is None:
            self.__dict__.setdefault("_local_unsubscribe", []).append(
                subscribe(callback, events))
            return
        subscriber = self.__dict__.get("_notify_subscriber")
        if subscriber is None:
            subscriber = self.__dict__["_notify_subscriber"] = RedisSubscriber(
                self.settings, url)
        subscriber.add(callback, events)

    def _close_notifications(self) -> None:
        subscriber = self.__dict__.pop("_notify_subscriber", None)
        if subscriber is not None:
            subscriber.close()
        for unsubscribe in self.__dict__.pop("_local_unsubscribe", []):
            unsubscribe()

    @_ledger_errors
    def close(self) -> None:
        """Flush lingering events, stop listening, close the connection."""
        self._close_notifications()
        if self._producer is not None:
            self._producer.close()
            self._producer = None

    def __enter__(self) -> LedgerClient:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()


def event_fields(**fields: Any) -> dict[str, Any]:
    """An event dict from keyword arguments, leaving out the ones not given (None)."""
    return {k: v for k, v in fields.items() if v is not None}


class _KeyOnly(BaseModel):
    key: Key


class _At(BaseModel):
    at: When
