"""Typed HTTP clients for services that call the API instead of publishing to the broker:
``HttpLedgerClient`` (httpx, blocking) and ``AsyncHttpLedgerClient`` (httpx, asyncio).

They have the ``LedgerClient`` methods a remote service needs, answer the same result
types (``tokenledger.results``) and raise the same exceptions (``TokenLedgerError`` and its
subclasses; an HTTP status becomes the error the API made it from, see
:func:`raise_for`). Events are validated locally by the SDK's own models before they are
sent. Every request is described once (:class:`Calls` builds a :class:`Call`: method,
path, query, body, headers and how to read the answer); the two clients differ only in
how they send it.

    with HttpLedgerClient("http://ledger:8000", api_key) as client:
        start = client.token_process_start("u1", "text_generation")
        client.extend(start.hold_id, 20)
        key = client.token_process_end("u1", "text_generation", 120, 640,
                                       hold_id=start.hold_id)
        print(client.result(key, timeout=10).data["cost"])
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx

from tokenledger.errors import (
    AccessDenied,
    AccountNotFound,
    BrokerUnavailable,
    Conflict,
    DatabaseUnavailable,
    InsufficientTokens,
    NotFound,
    ResultTimeout,
    ServiceUnavailable,
    TokenLedgerError,
    ValidationFailed,
)
from tokenledger.messages import AnyEvent
from tokenledger.results import (
    Affordability,
    Balance,
    Entry,
    EventResult,
    ExtendResult,
    RenewalResult,
    ResetResult,
    StartResult,
    Statistics,
    WalletInfo,
    of,
)
from tokenledger.sdk.client import build_event, event_fields
from tokenledger.sdk.process import TokenProcess
from tokenledger.sdk.stream import StreamingProcess

T = TypeVar("T")
HEADER = "x-server-api-key"


@dataclass(frozen=True)
class Call(Generic[T]):
    """One request and how its answer's ``data`` becomes the result."""

    method: str
    path: str
    read: Callable[[Any], T]
    params: dict[str, Any] | None = None
    json: Any = None
    headers: dict[str, str] = field(default_factory=dict)


def raise_for(response: httpx.Response) -> Any:
    """The envelope's ``data`` of a success; otherwise the SDK's exception for the status."""
    try:
        body = response.json()
    except ValueError:
        body = {}
    message = str(body.get("message") or response.reason_phrase) if isinstance(body, dict) \
        else response.reason_phrase
    status = response.status_code
    if status < 400:
        return body.get("data") if isinstance(body, dict) else None
    if status in (401, 403):
        raise AccessDenied(message)
    if status == 404:
        prefix = "Account not found: "
        if message.startswith(prefix):
            raise AccountNotFound(message[len(prefix):])
        raise NotFound(message)
    if status == 422:
        raise ValidationFailed(message.removeprefix("Invalid request: "))
    if status == 409:
        data = body.get("data") or {}
        raise Conflict(data.get("key", "") if isinstance(data, dict) else "", data)
    if status == 402:
        raise InsufficientTokens(0, 0)
    if status == 504:
        raise ResultTimeout(message)
    if status == 503:
        raise (BrokerUnavailable if "broker" in message else DatabaseUnavailable)(message)
    raise TokenLedgerError(f"HTTP {status}: {message}")


def _user(user_id: str) -> str:
    return quote(user_id, safe="")


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _start(data: dict[str, Any]) -> StartResult:
    accessible = data["status"] == "accessible"
    expires = data.get("expires_at")
    return StartResult(data["status"], data["token"], data.get("message"), data.get("hold_id"),
                       data.get("user_id"), None, data.get("cost") or 0 if accessible else 0,
                       None if accessible else data.get("cost"),
                       datetime.fromisoformat(expires) if expires else None)


def _balance(data: dict[str, Any]) -> Balance:
    wallets = [WalletInfo(w["id"], w["walletType"], w["balanceTokens"],
                          datetime.fromisoformat(w["expiresAt"]) if w.get("expiresAt") else None,
                          w["isActive"]) for w in data["wallets"]]
    return Balance(data["userId"], data["plan"], data.get("timezone", ""), data["balance"],
                   wallets)


def _entry(row: dict[str, Any]) -> Entry:
    return Entry(row["id"], row["userId"], row["walletId"], row["walletType"], row["amount"],
                 row["balanceBefore"], row["balanceAfter"], row["type"], row["feature"],
                 row["eventKey"], row["reference"], row["metadata"], row["description"],
                 datetime.fromisoformat(row["createdAt"]))


def _afford(data: dict[str, Any]) -> Affordability:
    return Affordability(data["userId"], data["feature"], data["cost"], data["balance"],
                         data["available"], data["canAfford"], data["deficit"],
                         data.get("reason"))


def _eligibility(data: dict[str, Any]) -> Any:
    from tokenledger.renewals.service import Eligibility

    values = _snake(data)
    return Eligibility(**{**values, "next_renewal_date":
                          datetime.fromisoformat(values["next_renewal_date"])})


def _snake(data: dict[str, Any]) -> dict[str, Any]:
    """An answer's top-level camelCase names as the SDK's snake_case ones."""
    return {re.sub(r"(?<!^)(?=[A-Z])", "_", k).lower(): v for k, v in data.items()}


def _outcome(key: str) -> Callable[[Any], EventResult]:
    return lambda data: EventResult(key, data["status"], data.get("reason"),
                                    data.get("result") or {})


class Calls:
    """Each API call the clients make, as a :class:`Call`."""

    @staticmethod
    def publish_many(events: Iterable[dict[str, Any] | AnyEvent]) -> Call[list[str]]:
        body = [build_event(e).to_message() for e in events]
        return Call("POST", "/api/events", lambda data: list(data["keys"]), json=body)

    @staticmethod
    def open_account(user_id: str, plan: str | None, timezone: str | None) -> Call[str]:
        return Call("POST", "/api/accounts", lambda _: f"open:{user_id}",
                    json=event_fields(user_id=user_id, plan=plan, timezone=timezone))

    @staticmethod
    def start(user_id: str, feature_endpoint_id: str, max_output_tokens: int | None,
              hold: int | None, model: str | None, key: str | None) -> Call[StartResult]:
        return Call("POST", "/api/token-process/start", _start,
                    json=event_fields(user_id=user_id, feature_endpoint_id=feature_endpoint_id,
                                      max_output_tokens=max_output_tokens, hold=hold,
                                      model=model),
                    headers={"Idempotency-Key": key} if key else {})

    @staticmethod
    def extend(hold_id: int, by: int | None, to_output_tokens: int | None,
               input_tokens: int, key: str | None) -> Call[ExtendResult]:
        return Call("POST", "/api/token-process/extend",
                    lambda data: ExtendResult.from_dict(_snake(data)),
                    json=event_fields(hold_id=hold_id, by=by, to_output_tokens=to_output_tokens,
                                      input_tokens=input_tokens),
                    headers={"Idempotency-Key": key} if key else {})

    @staticmethod
    def end(event: AnyEvent) -> Call[str]:
        m = event.to_message()
        body = {"user_id": m["user_id"], "feature_endpoint_id": m["feature_endpoint_id"],
                "input_token": m["input_tokens"], "output_token": m["output_tokens"],
                **event_fields(model=m.get("model"), hold_id=m.get("hold_id"), key=m["key"],
                               metadata=m.get("metadata"),
                               usage_reported=m.get("usage_reported"))}
        return Call("POST", "/api/token-process/end", lambda data: data["key"], json=body,
                    headers={"Prefer": "respond-async"})

    @staticmethod
    def outcome(key: str) -> Call[EventResult]:
        return Call("GET", f"/api/events/{quote(key, safe='')}", _outcome(key))

    @staticmethod
    def balance(user_id: str) -> Call[Balance]:
        return Call("GET", "/api/billing/balance", _balance, params={"user_id": user_id})

    @staticmethod
    def can_afford(user_id: str, feature: str) -> Call[Affordability]:
        return Call("GET", "/api/billing/can-afford", _afford,
                    params={"user_id": user_id, "feature": feature})

    @staticmethod
    def history(user_id: str, type_: str | None, feature: str | None,
                since: datetime | None, until: datetime | None, limit: int,
                offset: int) -> Call[list[Entry]]:
        return Call("GET", "/api/billing/transactions", lambda rows: [_entry(r) for r in rows],
                    params=event_fields(user_id=user_id, type=type_, feature=feature,
                                        start=_iso(since), end=_iso(until), limit=limit,
                                        offset=offset))

    @staticmethod
    def statistics(user_id: str, start: datetime | None,
                   end: datetime | None) -> Call[Statistics]:
        return Call("GET", f"/api/accounts/{_user(user_id)}/statistics",
                    lambda data: of(Statistics, _snake(data)),
                    params=event_fields(start=_iso(start), end=_iso(end)))

    @staticmethod
    def eligibility(user_id: str) -> Call[Any]:
        return Call("GET", f"/api/accounts/{_user(user_id)}/eligibility", _eligibility)

    @staticmethod
    def renew(user_id: str) -> Call[RenewalResult]:
        return Call("POST", f"/api/accounts/{_user(user_id)}/renew",
                    lambda data: of(RenewalResult, _snake(data)))

    @staticmethod
    def reset_balance(user_id: str, balance: int, reason: str,
                      key: str | None) -> Call[ResetResult]:
        return Call("POST", f"/api/accounts/{_user(user_id)}/reset-balance",
                    lambda data: ResetResult(**_snake(data)),
                    json={"balance": balance, "reason": reason},
                    headers={"Idempotency-Key": key} if key else {})


def _end_event(user_id: str, feature_endpoint_id: str, input_tokens: int, output_tokens: int,
               **options: Any) -> AnyEvent:
    usage_reported = options.pop("usage_reported", True)
    return build_event(event_fields(type="token_process_end", user_id=user_id,
                                    feature_endpoint_id=feature_endpoint_id,
                                    input_tokens=input_tokens, output_tokens=output_tokens,
                                    usage_reported=None if usage_reported else False,
                                    **options))


def _event(type_: str, **fields: Any) -> dict[str, Any]:
    return event_fields(type=type_, **fields)


class HttpLedgerClient:
    """The API, from blocking code: the SDK's methods, results and exceptions."""

    def __init__(self, base_url: str, api_key: str, *, timeout: float = 30,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.http = httpx.Client(base_url=base_url, timeout=timeout, transport=transport,
                                 headers={HEADER: api_key})

    def _send(self, call: Call[T]) -> T:
        try:
            response = self.http.request(call.method, call.path, params=call.params,
                                         json=call.json, headers=call.headers)
        except httpx.TransportError as exc:
            raise ServiceUnavailable(f"the ledger API is unreachable: {exc}") from exc
        return call.read(raise_for(response))

    def publish(self, event: dict[str, Any] | AnyEvent) -> str:
        return self._send(Calls.publish_many([event]))[0]

    def publish_many(self, events: Iterable[dict[str, Any] | AnyEvent]) -> list[str]:
        return self._send(Calls.publish_many(events))

    def charge(self, user_id: str, feature: str | None = None, amount: int | None = None,
               **fields: Any) -> str:
        return self.publish(_event("charge", user_id=user_id, feature=feature, amount=amount,
                                   **fields))

    def credit(self, user_id: str, amount: int, wallet_type: str = "PREMIUM",
               **fields: Any) -> str:
        return self.publish(_event("credit", user_id=user_id, amount=amount,
                                   wallet_type=wallet_type, **fields))

    def refund(self, user_id: str, original_key: str, amount: int | None = None,
               **fields: Any) -> str:
        return self.publish(_event("refund", user_id=user_id, original_key=original_key,
                                   amount=amount, **fields))

    def open_account(self, user_id: str, plan: str | None = None,
                     timezone: str | None = None) -> str:
        return self._send(Calls.open_account(user_id, plan, timezone))

    def token_process_start(self, user_id: str, feature_endpoint_id: str,
                            max_output_tokens: int | None = None, hold: int | None = None,
                            model: str | None = None, key: str | None = None) -> StartResult:
        return self._send(Calls.start(user_id, feature_endpoint_id, max_output_tokens, hold,
                                      model, key))

    def extend(self, hold_id: int, by: int | None = None, *,
               to_output_tokens: int | None = None, input_tokens: int = 0,
               key: str | None = None) -> ExtendResult:
        return self._send(Calls.extend(hold_id, by, to_output_tokens, input_tokens, key))

    def token_process_end(self, user_id: str, feature_endpoint_id: str, input_tokens: int,
                          output_tokens: int, **options: Any) -> str:
        return self._send(Calls.end(_end_event(user_id, feature_endpoint_id, input_tokens,
                                               output_tokens, **options)))

    def token_process(self, user_id: str | Callable[..., str], feature_endpoint_id: str, *,
                      max_output_tokens: int | None = None, hold: int | None = None,
                      model: str | None = None, stream: bool = False,
                      **stream_options: Any) -> TokenProcess | StreamingProcess:
        """``LedgerClient.token_process`` over the API (start, extend and end are this
        client's calls): the block or decorator, or with ``stream=True`` the streaming
        form."""
        if stream:
            return StreamingProcess(self, user_id, feature_endpoint_id, model=model,
                                    **stream_options)
        return TokenProcess(self, user_id, feature_endpoint_id,
                            max_output_tokens=max_output_tokens, hold=hold, model=model)

    def result(self, key: str, timeout: float | None = None) -> EventResult:
        """The stored outcome; with a timeout, wait for it (ResultTimeout)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            found = self._send(Calls.outcome(key))
            if found.status != "pending" or deadline is None:
                return found
            if time.monotonic() >= deadline:
                raise ResultTimeout(f"no outcome for key {key!r} after {timeout}s")
            time.sleep(0.05)

    def balance(self, user_id: str) -> Balance:
        return self._send(Calls.balance(user_id))

    def can_afford(self, user_id: str, feature: str) -> Affordability:
        return self._send(Calls.can_afford(user_id, feature))

    def history(self, user_id: str, type: str | None = None, *,  # noqa: A002
                feature: str | None = None, since: datetime | None = None,
                until: datetime | None = None, limit: int = 50,
                offset: int = 0) -> list[Entry]:
        return self._send(Calls.history(user_id, type, feature, since, until, limit, offset))

    def statistics(self, user_id: str, start: datetime | None = None,
                   end: datetime | None = None) -> Statistics:
        return self._send(Calls.statistics(user_id, start, end))

    def eligibility(self, user_id: str) -> Any:
        return self._send(Calls.eligibility(user_id))

    def renew(self, user_id: str) -> RenewalResult:
        return self._send(Calls.renew(user_id))

    def reset_balance(self, user_id: str, balance: int, reason: str, *,
                      key: str | None = None) -> ResetResult:
        return self._send(Calls.reset_balance(user_id, balance, reason, key))

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> HttpLedgerClient:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()


class AsyncHttpLedgerClient:
    """The API, from asyncio code (httpx's AsyncClient): the same calls, awaited."""

    def __init__(self, base_url: str, api_key: str, *, timeout: float = 30,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.http = httpx.AsyncClient(base_url=base_url, timeout=timeout, transport=transport,
                                      headers={HEADER: api_key})

    async def _send(self, call: Call[T]) -> T:
        try:
            response = await self.http.request(call.method, call.path, params=call.params,
                                               json=call.json, headers=call.headers)
        except httpx.TransportError as exc:
            raise ServiceUnavailable(f"the ledger API is unreachable: {exc}") from exc
        return call.read(raise_for(response))

    async def publish(self, event: dict[str, Any] | AnyEvent) -> str:
        return (await self._send(Calls.publish_many([event])))[0]

    async def publish_many(self, events: Iterable[dict[str, Any] | AnyEvent]) -> list[str]:
        return await self._send(Calls.publish_many(events))

    async def charge(self, user_id: str, feature: str | None = None,
                     amount: int | None = None, **fields: Any) -> str:
        return await self.publish(_event("charge", user_id=user_id, feature=feature,
                                         amount=amount, **fields))

    async def credit(self, user_id: str, amount: int, wallet_type: str = "PREMIUM",
                     **fields: Any) -> str:
        return await self.publish(_event("credit", user_id=user_id, amount=amount,
                                         wallet_type=wallet_type, **fields))

    async def refund(self, user_id: str, original_key: str, amount: int | None = None,
                     **fields: Any) -> str:
        return await self.publish(_event("refund", user_id=user_id,
                                         original_key=original_key, amount=amount, **fields))

    async def open_account(self, user_id: str, plan: str | None = None,
                           timezone: str | None = None) -> str:
        return await self._send(Calls.open_account(user_id, plan, timezone))

    async def token_process_start(self, user_id: str, feature_endpoint_id: str,
                                  max_output_tokens: int | None = None,
                                  hold: int | None = None, model: str | None = None,
                                  key: str | None = None) -> StartResult:
        return await self._send(Calls.start(user_id, feature_endpoint_id, max_output_tokens,
                                            hold, model, key))

    async def extend(self, hold_id: int, by: int | None = None, *,
                     to_output_tokens: int | None = None, input_tokens: int = 0,
                     key: str | None = None) -> ExtendResult:
        return await self._send(Calls.extend(hold_id, by, to_output_tokens, input_tokens, key))

    async def token_process_end(self, user_id: str, feature_endpoint_id: str,
                                input_tokens: int, output_tokens: int, **options: Any) -> str:
        return await self._send(Calls.end(_end_event(user_id, feature_endpoint_id,
                                                     input_tokens, output_tokens, **options)))

    async def result(self, key: str, timeout: float | None = None) -> EventResult:
        """The stored outcome; with a timeout, wait for it (ResultTimeout)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            found = await self._send(Calls.outcome(key))
            if found.status != "pending" or deadline is None:
                return found
            if time.monotonic() >= deadline:
                raise ResultTimeout(f"no outcome for key {key!r} after {timeout}s")
            await asyncio.sleep(0.05)

    async def balance(self, user_id: str) -> Balance:
        return await self._send(Calls.balance(user_id))

    async def can_afford(self, user_id: str, feature: str) -> Affordability:
        return await self._send(Calls.can_afford(user_id, feature))

    async def history(self, user_id: str, type: str | None = None, *,  # noqa: A002
                      feature: str | None = None, since: datetime | None = None,
                      until: datetime | None = None, limit: int = 50,
                      offset: int = 0) -> list[Entry]:
        return await self._send(Calls.history(user_id, type, feature, since, until, limit,
                                              offset))

    async def statistics(self, user_id: str, start: datetime | None = None,
                         end: datetime | None = None) -> Statistics:
        return await self._send(Calls.statistics(user_id, start, end))

    async def eligibility(self, user_id: str) -> Any:
        return await self._send(Calls.eligibility(user_id))

    async def renew(self, user_id: str) -> RenewalResult:
        return await self._send(Calls.renew(user_id))

    async def reset_balance(self, user_id: str, balance: int, reason: str, *,
                            key: str | None = None) -> ResetResult:
        return await self._send(Calls.reset_balance(user_id, balance, reason, key))

    async def close(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncHttpLedgerClient:
        return self

    async def __aexit__(self, *_: Any) -> None:
        await self.close()
