"""Error answers of the HTTP API: one envelope, the right status, never a traceback."""

from __future__ import annotations

import logging
from typing import Any

import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenledger.api.auth import HEADER, AuthError, current_key
from tokenledger.db.errors import Failure, classify
from tokenledger.errors import (
    AccountNotFound,
    BrokerUnavailable,
    CatalogError,
    Conflict,
    InsufficientTokens,
    ResultTimeout,
    ServiceUnavailable,
    TokenLedgerError,
    ValidationFailed,
)

log = logging.getLogger("tokenledger.api")

# A batch of 1,000 events, each with 16 KiB of metadata, fits with room to spare.
MAX_BODY_BYTES = 24 * 1024 * 1024


def error(status: int, message: str, errors: list[dict[str, Any]] | None = None,
          headers: dict[str, str] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"success": False, "status": status, "message": message}
    if errors is not None:
        body["errors"] = errors
    return JSONResponse(body, status_code=status, headers=headers)


def field_errors(raw: list[Any]) -> list[dict[str, Any]]:
    """FastAPI/pydantic error items as ``{field, location, message, type}``."""
    out = []
    for item in raw:
        loc = [str(p) for p in item.get("loc", ())]
        location = loc[0] if loc and loc[0] in ("body", "query", "path", "header") else "body"
        path = loc[1:] if loc and loc[0] == location else loc
        # Drop pydantic's union branch names (function-after[...], etc.).
        path = [p for p in path if "[" not in p and not p.startswith("function-")]
        kind = str(item.get("type"))
        if kind == "json_invalid":
            path = []  # FastAPI puts the character position where a field name goes
        message = _BODY_MESSAGES.get(kind) if location == "body" and not path else None
        if kind == "json_invalid":
            message = _not_json(item)
        out.append({"field": ".".join(path) or location, "location": location,
                    "message": message or str(item.get("msg", "invalid")), "type": kind})
    return out


# What a whole body that is not an object says, in words a caller can act on.
_BODY_MESSAGES = {
    "missing": "the request body is required: a JSON object",
    "model_attributes_type": "the request body must be a JSON object",
    "dict_type": "the request body must be a JSON object",
}


def _not_json(item: dict[str, Any]) -> str:
    """FastAPI's ``JSON decode error`` with the parser's reason and where it stopped."""
    loc = item.get("loc", ())
    position = loc[1] if len(loc) > 1 and isinstance(loc[1], int) else None
    reason = (item.get("ctx") or {}).get("error")
    where = f" at character {position}" if position is not None else ""
    return f"the request body is not valid JSON ({reason or 'unparsable'}{where}); " \
           "send a JSON object with Content-Type: application/json"


def validation_response(errors: list[dict[str, Any]]) -> JSONResponse:
    summary = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:10])
    return error(422, f"Invalid request: {summary}", errors)


def _split_failed(message: str) -> list[dict[str, Any]]:
    """A ValidationFailed text (``field: msg; field: msg``) as field errors."""
    out = []
    for part in message.split("; "):
        field, _, msg = part.partition(": ")
        if not msg:
            field, msg = "body", part
        out.append({"field": field, "location": "body", "message": msg, "type": "value_error"})
    return out


async def _on_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
    return validation_response(field_errors(list(exc.errors())))


async def _on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # A path no route matches (a user id with a "/" or a newline, a typo) under /api/
    # still needs a key first: callers without one learn nothing about the routes.
    if exc.status_code in (404, 405) and request.url.path.startswith("/api/"):
        try:
            await current_key(request, request.headers.get(HEADER))
        except AuthError as denied:
            return error(denied.status, denied.message)
    message = exc.detail if isinstance(exc.detail, str) else "HTTP error"
    return error(exc.status_code, message, headers=getattr(exc, "headers", None))


async def _on_auth(_: Request, exc: AuthError) -> JSONResponse:
    return error(exc.status, exc.message)


async def _on_ledger(_: Request, exc: TokenLedgerError) -> JSONResponse:
    if isinstance(exc, AccountNotFound):
        return error(404, f"Account not found: {exc.user_id}")
    if type(exc).__name__.endswith("NotFound"):
        return error(404, str(exc))
    if isinstance(exc, ValidationFailed):
        errors = _split_failed(str(exc))
        return validation_response(errors)
    if isinstance(exc, Conflict):
        return error(409, str(exc))
    if isinstance(exc, InsufficientTokens):
        return error(402, f"Insufficient tokens (required {exc.required}, "
                          f"available {exc.available})")
    if isinstance(exc, ResultTimeout):
        return error(504, str(exc))
    if isinstance(exc, CatalogError):
        log.error("catalog unavailable: %s", exc)
        return error(503, "The catalog is not loaded; run `tokenledger migrate`")
    if isinstance(exc, ServiceUnavailable):
        log.error("%s", exc)
        what = "broker" if isinstance(exc, BrokerUnavailable) else "database"
        return error(503, f"The {what} is unavailable; retry shortly",
                     headers={"Retry-After": "1"})
    return error(400, str(exc))


async def _on_database(_: Request, exc: DBAPIError) -> JSONResponse:
    if classify(exc) is Failure.UNAVAILABLE:
        log.error("database unavailable: %s", type(exc.orig).__name__ if exc.orig else exc)
        return error(503, "The database is unavailable; retry shortly",
                     headers={"Retry-After": "1"})
    log.exception("database error")
    return error(500, "Internal server error")


async def _on_driver(_: Request, exc: psycopg.Error) -> JSONResponse:
    # psycopg's own errors come from the start pool (the rest goes through SQLAlchemy).
    if isinstance(exc, psycopg.OperationalError):
        log.error("database unavailable: %s", type(exc).__name__)
        return error(503, "The database is unavailable; retry shortly",
                     headers={"Retry-After": "1"})
    log.error("database error", exc_info=exc)
    return error(500, "Internal server error")


async def _on_broker(_: Request, exc: Exception) -> JSONResponse:
    log.error("broker unavailable: %s", type(exc).__name__)
    return error(503, "The broker is unavailable; retry shortly", headers={"Retry-After": "1"})


async def _on_unexpected(_: Request, exc: Exception) -> JSONResponse:
    # Broker outages surface as kombu/redis connection errors: a 503 the caller can retry.
    name = type(exc).__module__ + "." + type(exc).__name__
    if isinstance(exc, ConnectionError | TimeoutError) or name.startswith(
            ("kombu.exceptions.OperationalError", "redis.exceptions.ConnectionError",
             "redis.exceptions.TimeoutError")):
        log.error("broker unavailable: %s", type(exc).__name__)
        return error(503, "The broker is unavailable; retry shortly",
                     headers={"Retry-After": "1"})
    log.error("unhandled error", exc_info=exc)
    return error(500, "Internal server error")


class BodyLimit:
    """413 for request bodies over ``limit`` bytes, declared or streamed."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                if not value.isdigit() or int(value) > self.limit:
                    await error(413, f"Request body larger than {self.limit} bytes")(
                        scope, receive, send)
                    return
                break
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge()
            return message

        await self.app(scope, counted, send)


class _TooLarge(StarletteHTTPException):
    # An HTTPException, so FastAPI's body reader passes it on to the envelope handler.
    def __init__(self) -> None:
        super().__init__(413, f"Request body larger than {MAX_BODY_BYTES} bytes")


def install(app: FastAPI) -> None:
    """Register every handler and the body limit on ``app``."""
    import kombu.exceptions
    import redis.exceptions

    app.add_exception_handler(RequestValidationError, _on_validation)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _on_http)  # type: ignore[arg-type]
    app.add_exception_handler(AuthError, _on_auth)  # type: ignore[arg-type]
    app.add_exception_handler(TokenLedgerError, _on_ledger)  # type: ignore[arg-type]
    app.add_exception_handler(DBAPIError, _on_database)  # type: ignore[arg-type]
    for broker_error in (kombu.exceptions.OperationalError, redis.exceptions.ConnectionError,
                         redis.exceptions.TimeoutError):
        app.add_exception_handler(broker_error, _on_broker)
    app.add_exception_handler(Exception, _on_unexpected)
    app.add_exception_handler(psycopg.Error, _on_driver)  # type: ignore[arg-type]
    app.add_middleware(BodyLimit)


async def handle(app: Any, scope: Scope, receive: Receive, exc: Exception) -> Any:
    """The response the app's exception handlers give ``exc`` (for code outside routes)."""
    handlers = app.exception_handlers
    for cls in type(exc).__mro__:
        handler = handlers.get(cls)
        if handler is not None:
            return await handler(Request(scope, receive), exc)
    raise exc
