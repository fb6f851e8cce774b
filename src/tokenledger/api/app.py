"""The FastAPI application: state built in the lifespan, error envelopes, health and metrics."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sqlalchemy.exc import DBAPIError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenledger.api.auth import HEADER, AuthError, current_key
from tokenledger.api.fastpath import PATH as START_PATH
from tokenledger.api.fastpath import StartFastPath
from tokenledger.api.pgpipe import StartPool
from tokenledger.api.schemas import ErrorBody
from tokenledger.apikeys import KeyCache
from tokenledger.client import LedgerClient
from tokenledger.config import Settings, get_settings
from tokenledger.db import configure_pool, is_disconnect
from tokenledger.errors import (
    AccountNotFound,
    CatalogError,
    IdempotencyConflict,
    InsufficientTokens,
    ResultTimeout,
    TokenLedgerError,
    ValidationFailed,
)

log = logging.getLogger("tokenledger.api")

# A batch of 1,000 events, each with 16 KiB of metadata, fits with room to spare.
MAX_BODY_BYTES = 24 * 1024 * 1024
# Threads for starts on other databases (SQLite: one writer at a time anyway).
START_THREADS = 4
# Pooled SQLAlchemy connections of the sync routes.
SYNC_CONNECTIONS = 32


@dataclass
class ApiState:
    """What every request needs, built once per process in the lifespan."""

    settings: Settings
    client: LedgerClient
    keys: KeyCache
    end_wait: float
    # Token-process starts on PostgreSQL: pipelined from the event loop (pgpipe).
    start_pool: StartPool | None
    # Elsewhere they run here, not in the shared threadpool, so they never wait behind
    # slow reads.
    starts: ThreadPoolExecutor


# -- error bodies -------------------------------------------------------------------------


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
        out.append({"field": ".".join(path) or location, "location": location,
                    "message": str(item.get("msg", "invalid")), "type": str(item.get("type"))})
    return out


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
    if isinstance(exc, IdempotencyConflict):
        return error(409, str(exc))
    if isinstance(exc, InsufficientTokens):
        return error(402, f"Insufficient tokens (required {exc.required}, "
                          f"available {exc.available})")
    if isinstance(exc, ResultTimeout):
        return error(504, str(exc))
    if isinstance(exc, CatalogError):
        log.error("catalog unavailable: %s", exc)
        return error(503, "The catalog is not loaded; run `tokenledger migrate`")
    return error(400, str(exc))


async def _on_database(_: Request, exc: DBAPIError) -> JSONResponse:
    if is_disconnect(exc) or isinstance(exc, OperationalError):
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


# -- body limit ---------------------------------------------------------------------------


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


# -- the factory --------------------------------------------------------------------------


class TokenLedgerAPI(FastAPI):
    """FastAPI with the token-process start's fast path in front of its whole stack.

    Ordinary starts skip FastAPI's per-request layers (telemetry check, error and body
    limit middlewares, routing, dependencies); everything else, including any start the
    fast path does not take, goes through them as before (see ``api.fastpath``).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fast_start = StartFastPath(self, super().__call__)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == START_PATH \
                and scope["method"] == "POST":
            await self.fast_start(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


def create_app(settings: Settings | None = None, *, key_cache_seconds: float = 2.0,
               end_wait_seconds: float = 10.0) -> FastAPI:
    """The tokenledger HTTP API over ``settings``' database and broker."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = LedgerClient(settings)
        starts = ThreadPoolExecutor(START_THREADS, thread_name_prefix="tokenledger-start")
        pool = StartPool(settings, settings.start_connections) \
            if settings.database_url.startswith("postgresql") else None
        app.state.api = ApiState(settings, client, KeyCache(key_cache_seconds),
                                 end_wait_seconds, pool, starts)
        try:
            yield
        finally:
            if pool is not None:
                await pool.close()
            starts.shutdown(wait=True)
            client.close()

    app = TokenLedgerAPI(
        title="tokenledger",
        version="1",
        summary="Token (credit) accounting for AI-powered applications.",
        description=(
            "Every `/api/*` route needs the `x-server-api-key` header (scopes `producer`, "
            "`reader`, `admin`). Answers are `{\"success\", \"message\", \"data\"}`; errors "
            "are `{\"success\": false, \"status\", \"message\"}`, with `errors[]` naming "
            "each bad field on 422."),
        lifespan=lifespan,
        responses={422: {"model": ErrorBody, "description": "A field failed validation"}},
    )
    app.add_exception_handler(RequestValidationError, _on_validation)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _on_http)  # type: ignore[arg-type]
    app.add_exception_handler(AuthError, _on_auth)  # type: ignore[arg-type]
    app.add_exception_handler(TokenLedgerError, _on_ledger)  # type: ignore[arg-type]
    app.add_exception_handler(DBAPIError, _on_database)  # type: ignore[arg-type]
    import kombu.exceptions
    import redis.exceptions

    for broker_error in (kombu.exceptions.OperationalError, redis.exceptions.ConnectionError,
                         redis.exceptions.TimeoutError):
        app.add_exception_handler(broker_error, _on_broker)
    app.add_exception_handler(Exception, _on_unexpected)
    app.add_exception_handler(psycopg.Error, _on_driver)  # type: ignore[arg-type]
    app.add_middleware(BodyLimit)

    from tokenledger.api import accounts, admin, billing, events, tokenprocess

    for module in (billing, tokenprocess, events, accounts, admin):
        app.include_router(module.router)
    _add_operational_routes(app)

    generate = app.openapi

    def openapi() -> dict[str, Any]:
        # The events body is described by the message schemas themselves; add their parts.
        if app.openapi_schema is None:
            schema = generate()
            schema.setdefault("components", {}).setdefault("schemas", {}).update(
                events.openapi_components())
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def app_from_env() -> FastAPI:
    """The app for ``uvicorn --factory``: settings from the TOKENLEDGER_* environment."""
    from tokenledger.logs import configure_logging

    settings = get_settings()
    configure_logging(settings.log_level, settings.log_json)  # JSON lines, keys scrubbed
    configure_server_pool()
    app = create_app(settings)
    # What is alive now (modules, the app, its routes and schemas) lives as long as the
    # process: keep it out of the collector's full passes, which otherwise walk all of
    # it every so often and stall every request in flight meanwhile.
    gc.freeze()
    return app


def configure_server_pool() -> None:
    """The SQLAlchemy pool of an API server process (call before its first request)."""
    # A connection for each thread of the shared threadpool that runs the sync routes
    # (and the start threads off PostgreSQL), kept open between bursts. No ping before
    # each checkout (a round trip per request): a connection found dead invalidates the
    # pool, a start retries it (nothing was committed), and other requests answer 503
    # with Retry-After once. Starts on PostgreSQL use their own pool (pgpipe).
    configure_pool(pool_size=SYNC_CONNECTIONS, max_overflow=SYNC_CONNECTIONS // 2,
                   pre_ping=False)


def _add_operational_routes(app: FastAPI) -> None:
    @app.get("/healthz", tags=["operations"], summary="The process is up")
    async def healthz() -> dict[str, Any]:
        return {"success": True, "data": {"status": "ok"}}

    @app.get("/readyz", tags=["operations"], summary="The database and the broker answer",
             responses={503: {"model": ErrorBody}})
    def readyz(request: Request) -> JSONResponse:
        from tokenledger.health import readiness

        state: ApiState = request.app.state.api
        ok, results = readiness(state.settings)
        checks = {c.name: "ok" if c.ok else f"unavailable ({c.detail})" for c in results}
        body = {"success": ok, "message": None if ok else "not ready", "data": checks}
        if not ok:
            body["status"] = 503
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics",
             response_class=Response)
    def metrics(request: Request) -> Response:
        from tokenledger.metrics import render

        payload, content_type = render(request.app.state.api.settings)
        return Response(payload, media_type=content_type)
