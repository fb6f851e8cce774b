"""``x-server-api-key`` on every /api route: cached lookups, scopes, the seed's 401 body."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader
from starlette.concurrency import run_in_threadpool

from tokenledger.apikeys import KeyInfo, authenticate
from tokenledger.db import unit_of_work

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


def _lookup(url: str, key: str) -> KeyInfo | None:
    with unit_of_work(url) as session:
        return authenticate(session, key)


async def current_key(request: Request,
                      key: Annotated[str | None, Depends(_header)]) -> KeyInfo:
    """The caller's active key (from the per-process cache when fresh), else 401."""
    if not key:
        raise AuthError(401, INVALID)
    state = request.app.state.api
    hit, info = state.keys.get(key)
    if not hit:
        info = await run_in_threadpool(_lookup, state.settings.database_url, key)
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

    return _check
