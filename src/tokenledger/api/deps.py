"""What the routers share: the per-process state, envelopes, waiting for an outcome."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Annotated, Any, NoReturn

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic.alias_generators import to_camel

from tokenledger.api.schemas import ErrorBody
from tokenledger.apikeys.service import KeyCache
from tokenledger.config import Settings
from tokenledger.db.sql import statement
from tokenledger.db.uow import unit_of_work
from tokenledger.results import WalletInfo
from tokenledger.sdk.client import LedgerClient
from tokenledger.tokenprocess.pool import StartPool

AUTH_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "Missing or invalid `x-server-api-key`"},
    403: {"model": ErrorBody, "description": "The key's scope does not allow this"},
    404: {"model": ErrorBody, "description": "No such account"},
}


@dataclass
class ApiState:
    """What every request needs, built once per process in the lifespan."""

    settings: Settings
    client: LedgerClient
    keys: KeyCache
    end_wait: float
    # Token-process starts: pipelined from the event loop (tokenprocess.pool).
    start_pool: StartPool


async def state(request: Request) -> ApiState:
    """The per-process API state (a FastAPI dependency; async, so FastAPI does not hop to
    a worker thread to run it)."""
    return request.app.state.api


def ok(data: Any, message: str | None = None) -> dict[str, Any]:
    return {"success": True, "message": message, "data": data}


def respond(status: int, data: Any, message: str | None = None,
            success: bool = True) -> JSONResponse:
    """An envelope with an explicit status code (data must be JSON-ready)."""
    body: dict[str, Any] = {"success": success, "message": message, "data": data}
    if not success:
        body["status"] = status
    return JSONResponse(body, status_code=status)


def camel_keys(value: Any) -> Any:
    """``value`` with every mapping key in camelCase, at every depth: the field names of
    the routes the seeds do not define (docs/api.md), for reports built as plain dicts."""
    if isinstance(value, dict):
        return {to_camel(k) if isinstance(k, str) else k: camel_keys(v)
                for k, v in value.items()}
    if isinstance(value, list):
        return [camel_keys(v) for v in value]
    return value


def wants_async(prefer: str | None) -> bool:
    """RFC 7240: ``Prefer: respond-async`` asks for 202 instead of waiting."""
    return bool(prefer) and any(p.strip().lower() == "respond-async"
                                for p in prefer.split(","))


def wallet_out(w: WalletInfo) -> dict[str, Any]:
    """A wallet in the seeds' shape."""
    return {"id": w.id, "balanceTokens": w.balance, "walletType": w.wallet_type,
            "isActive": w.is_active,
            "expiresAt": w.expires_at.isoformat() if w.expires_at else None}


@dataclass(frozen=True)
class Outcome:
    key: str
    status: str  # applied | declined | rejected | dead_lettered | conflict | pending
    reason: str | None = None
    result: dict[str, Any] = field(default_factory=dict)


def lookup(settings: Settings, key: str, payload_hash: str | None = None) -> Outcome:
    """The stored outcome of ``key`` now (``ledger/sql/outcome.sql``); ``conflict`` if it
    was stored for another payload."""
    with unit_of_work(settings) as uow:
        row = uow.session.execute(statement("tokenledger.ledger", "outcome"),
                                  {"key": key}).first()
    if row is None:
        return Outcome(key, "pending")
    _, outcome, reason, result, stored_hash, _message = row
    if payload_hash is not None and stored_hash is not None and stored_hash != payload_hash:
        return Outcome(key, "conflict", f"key {key!r} was first used with another payload "
                       f"(stored outcome: {outcome}); this request was not applied")
    return Outcome(key, outcome, reason, result or {})


def wait_outcome(settings: Settings, key: str, payload_hash: str | None,
                 timeout: float) -> Outcome:
    """Poll for the worker's stored outcome for at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.003
    while True:
        found = lookup(settings, key, payload_hash)
        if found.status != "pending" or time.monotonic() >= deadline:
            return found
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 1.5, 0.05)


Api = Annotated[ApiState, Depends(state)]


def invalid(location: str, field: str, message: str) -> NoReturn:
    """Raise a 422 naming one field, like FastAPI's own validation errors."""
    raise RequestValidationError([{"loc": (location, field), "msg": message,
                                   "type": "value_error"}])


def publish_and_wait(api: Any, event: Any, pending: dict[str, Any],
                     prefer: str | None) -> Outcome | JSONResponse:
    """Publish ``event``; answer 202 with ``pending`` when the caller prefers async or the
    worker's outcome is not stored within the bounded wait, else return the outcome."""
    api.client.publish(event)
    if wants_async(prefer):
        return respond(202, pending, "Accepted; GET /api/events/{key} for the outcome")
    outcome = wait_outcome(api.settings, event.key, event.payload_hash(), api.end_wait)
    if outcome.status == "pending":
        return respond(202, pending, "Accepted; the outcome is not stored yet")
    return outcome
