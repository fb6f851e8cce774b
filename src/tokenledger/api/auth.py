"""``x-server-api-key`` on every /api route: cached lookups, scopes, the seed's 401 body."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader
from starlette.concurrency import run_in_threadpool

from tokenledger.apikeys.service import KeyInfo, authenticate
from tokenledger.config import Settings
from tokenledger.db.uow import unit_of_work

log = logging.getLogger("tokenledger.api.auth")

HEADER = "x-server-api-key"
_header = APIKeyHeader(name=HEADER, auto_error=False,
                       description="A server API key from `tokenledger keys create`.")

# Which scopes may call what; ``admin`` may call everything.
PRODUCE = ("producer",)
READ = ("reader",)
READ_EVENTS = ("reader", "producer")
ADMIN: tuple[str, ...] = ()


class AuthError(Exception):
    """401 (no valid key) or 403 (valid key, wrong scope)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


INVALID = "Invalid server API key"


def _lookup(settings: Settings, key: str) -> KeyInfo | None:
    with unit_of_work(settings) as uow:
        return authenticate(uow.session, key)


def _refresh(state: Any, key: str) -> None:
    """Look ``key`` up again and cache the answer (off the event loop)."""
    try:
        info = _lookup(state.settings, key)
    except Exception as exc:  # noqa: BLE001 - the cached answer stays until it expires
        state.keys.put_failed(key)
        log.warning("could not refresh a cached API key: %s", type(exc).__name__)
        return
    state.keys.put(key, info)


def refresh_soon(state: Any, key: str) -> None:
    """:func:`_refresh` in the default executor, without waiting for it."""
    asyncio.get_running_loop().run_in_executor(None, _refresh, state, key)


async def current_key(request: Request,
                      key: Annotated[str | None, Depends(_header)]) -> KeyInfo:
    """The caller's active key (from the per-process cache when fresh), else 401."""
    if not key:
        raise AuthError(401, INVALID)
    state = request.app.state.api
    hit, info, refresh = state.keys.lookup(key)
    if refresh:
        refresh_soon(state, key)
    if not hit:
        info = await run_in_threadpool(_lookup, state.settings, key)
        state.keys.put(key, info)
    if info is None:
        raise AuthError(401, INVALID)
    return info


def require(*scopes: str) -> Callable[..., Awaitable[KeyInfo]]:
    """A dependency admitting keys whose scope is in ``scopes`` (or ``admin``), else 403."""
    allowed = frozenset(scopes) | {"admin"}
    needed = " or ".join(sorted(allowed))

    async def _check(info: Annotated[KeyInfo, Depends(current_key)]) -> KeyInfo:
        if info.scope not in allowed:
            raise AuthError(403, f"This API key's scope ({info.scope}) does not allow this "
                                 f"operation; it needs {needed}")
        return info

    # For the documents (label_scopes): the route's own scopes first, admin last.
    _check.scopes = (*sorted(allowed - {"admin"}), "admin")  # type: ignore[attr-defined]
    return _check


def route_scopes(dependant: Any) -> tuple[str, ...] | None:
    """The scopes a route's :func:`require` admits; None for a public route (no key)."""
    for sub in dependant.dependencies:
        found = getattr(sub.call, "scopes", None) or route_scopes(sub)
        if found:
            return found
    return None


def label_scopes(schema: dict[str, Any], routes: Any) -> None:
    """End every operation's summary in ``schema`` with the scope it needs (or ``public``)
    and list the scopes as ``x-scopes``: one rule, read from each route's own
    :func:`require`, so the documents cannot drift from what is enforced."""
    from fastapi import routing

    # FastAPI ≥ 0.160 keeps included routers unflattened; older versions list every route.
    walk = getattr(routing, "iter_route_contexts", iter)
    for route in walk(routes):
        operations = schema["paths"].get(getattr(route, "path_format", None), {})
        for method in getattr(route, "methods", None) or ():
            operation = operations.get(method.lower())
            if operation is None:
                continue
            scopes = route_scopes(route.dependant)
            needs = f"scope: {' or '.join(scopes)}" if scopes else "public, no key"
            operation["summary"] = f"{operation.get('summary', route.name)} ({needs})"
            operation["x-scopes"] = list(scopes or ())
