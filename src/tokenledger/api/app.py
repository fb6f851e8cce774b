"""The FastAPI application: state built in the lifespan, the routers, the start's fast path."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from tokenledger import dashboard
from tokenledger.api import errors
from tokenledger.api.auth import label_scopes
from tokenledger.api.deps import ApiState
from tokenledger.api.schemas import ErrorBody
from tokenledger.api.tokenprocess import START_PATH, StartFastPath
from tokenledger.apikeys.service import KeyCache
from tokenledger.config import Settings, get_settings
from tokenledger.db.engine import configure_pool
from tokenledger.sdk.client import LedgerClient
from tokenledger.tokenprocess.pool import StartPool

# Pooled SQLAlchemy connections of the sync routes.
SYNC_CONNECTIONS = 32


class TokenLedgerAPI(FastAPI):
    """FastAPI with the token-process start's fast path in front of its whole stack.

    Ordinary starts skip FastAPI's per-request layers (middlewares, routing, dependencies);
    everything else, including any start the fast path does not take, goes through them
    (see ``api.tokenprocess.StartFastPath``).
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
        pool = StartPool(settings, settings.start_connections)
        app.state.api = ApiState(settings, client, KeyCache(key_cache_seconds),
                                 end_wait_seconds, pool)
        dashboard.open_feed(app, settings)
        try:
            yield
        finally:
            dashboard.close(app)
            await pool.close()
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
        docs_url=None,  # served by api.docs from bundled assets
        redoc_url=None,  # ReDoc would load its script from a CDN
        responses={422: {"model": ErrorBody, "description": "A field failed validation"}},
    )
    errors.install(app)

    from tokenledger.api import (
        account_ops,
        accounts,
        billing,
        conflicts,
        dashboard_links,
        docs,
        events,
        operations,
        renewals,
        tokenprocess,
    )

    for module in (billing, tokenprocess, events, conflicts, accounts, account_ops, renewals,
                   operations, dashboard_links):
        app.include_router(module.router)
    dashboard.mount(app)
    docs.install(app)

    generate = app.openapi

    def openapi() -> dict[str, Any]:
        # The events body is described by the message schemas themselves; add their parts.
        if app.openapi_schema is None:
            schema = generate()
            schema.setdefault("components", {}).setdefault("schemas", {}).update(
                events.openapi_components())
            label_scopes(schema, app.routes)
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def app_from_env() -> FastAPI:
    """The app for ``uvicorn --factory``: settings from the TOKENLEDGER_* environment."""
    from tokenledger.ops.logs import configure_logging

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
    # A connection for each thread of the shared threadpool that runs the sync routes,
    # kept open between bursts. No ping before each checkout (a round trip per request):
    # a connection found dead invalidates the pool, and requests answer 503 with
    # Retry-After once. Starts use their own pool (tokenprocess.pool).
    configure_pool(pool_size=SYNC_CONNECTIONS, max_overflow=SYNC_CONNECTIONS // 2,
                   pre_ping=False)
