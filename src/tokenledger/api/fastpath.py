"""``POST /api/token-process/start`` without FastAPI's per-request machinery.

The start is the API's hot path: a few hundred microseconds of database work, which
FastAPI's middlewares, routing, dependency resolution and validation used to double.
The app (``app.TokenLedgerAPI``) hands the start's requests to this fast path before its
own stack; it answers the ordinary start itself, with the same pieces the route uses
(the ``StartIn`` model, the key cache, the start pool, the route's answer), and hands
everything else to FastAPI untouched, so every unusual request (a body or header that
does not validate, a key not in the cache, a key of another scope, another content
type, a body without a length or a large one) gets exactly the route's answer, error
bodies included:

- the body is parsed with ``json.loads`` and validated by ``StartIn.model_validate`` as
  FastAPI does; any failure falls through (with the body replayed), and FastAPI then
  produces its 422;
- the key must be a cached, active ``producer`` or ``admin`` key (``KeyCache``: a revoked
  key stops working within its TTL, as on every other route); a miss falls through, and
  the route's dependency looks the key up and fills the cache;
- errors of the start itself go to the app's exception handlers, like the route's.

FastAPI's native OpenTelemetry instrumentation, when configured, sees only the starts
that fall through.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import TypeAdapter, ValidationError
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenledger.api.auth import HEADER, PRODUCE, refresh_soon
from tokenledger.api.schemas import Key, StartIn

PATH = "/api/token-process/start"
# A start's body is a few hundred bytes at most; a larger one is not ordinary.
MAX_FAST_BODY = 16 * 1024
ALLOWED_SCOPES = frozenset(PRODUCE) | {"admin"}
_KEY = TypeAdapter(Key)
_API_KEY = HEADER.encode()


class StartFastPath:
    """Answers ordinary token-process starts for ``app``; passes every other request to
    ``fallback`` (the app's own stack)."""

    def __init__(self, app: Any, fallback: ASGIApp) -> None:
        self.app = app
        self.fallback = fallback

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer ``POST /api/token-process/start`` (the caller checked the route)."""
        api = getattr(self.app.state, "api", None)  # None before the lifespan ran
        prepared = self._prepare(scope, api)
        if prepared is None:
            await self.fallback(scope, receive, send)
            return
        length, api_key, idempotency_key = prepared
        body, receive = await _read_body(receive, length)
        started = self._validate(body, api_key, idempotency_key, api)
        if started is None:
            await self.fallback(scope, receive, send)
            return
        from tokenledger.api.tokenprocess import start_body

        request, key = started
        try:
            result = await api.start_pool.start(
                request.user_id, request.feature_endpoint_id,
                max_output_tokens=request.max_output_tokens, hold=request.hold,
                model=request.model, key=key)
        except Exception as exc:  # noqa: BLE001 - answered by the app's handlers
            scope["app"] = self.app
            response = await _handle(self.app, scope, receive, exc)
            await response(scope, receive, send)
            return
        # JSONResponse's bytes and headers, without building one.
        content = json.dumps(start_body(request.user_id, result), ensure_ascii=False,
                             allow_nan=False, separators=(",", ":")).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(content)).encode()),
                                (b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": content})

    @staticmethod
    def _prepare(scope: Scope, api: Any) -> tuple[int, str, bytes | None] | None:
        """(body length, API key, idempotency key) of a request this path may answer."""
        if api is None or api.start_pool is None:
            return None
        length = api_key = idempotency_key = content_type = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                if length is not None or not value.isdigit():
                    return None
                length = int(value)
            elif name == _API_KEY:
                if api_key is not None:
                    return None
                api_key = value
            elif name == b"idempotency-key":
                if idempotency_key is not None:
                    return None
                idempotency_key = value
            elif name == b"content-type":
                if content_type is not None:
                    return None
                content_type = value
            elif name == b"transfer-encoding":
                return None
        if length is None or length > MAX_FAST_BODY or api_key is None \
                or content_type is None or content_type.lower() != b"application/json":
            return None
        return length, api_key.decode("latin-1"), idempotency_key

    @staticmethod
    def _validate(body: bytes | None, api_key: str, idempotency_key: bytes | None,
                  api: Any) -> tuple[StartIn, str | None] | None:
        """The validated request and idempotency key, if the key is a known producer."""
        if body is None:
            return None
        hit, info, refresh = api.keys.lookup(api_key)
        if refresh:
            refresh_soon(api, api_key)
        if not hit or info is None or info.scope not in ALLOWED_SCOPES:
            return None
        try:
            data = json.loads(body)
            if type(data) is not dict:
                return None
            request = StartIn.model_validate(data)
            key = None if idempotency_key is None else \
                _KEY.validate_python(idempotency_key.decode("latin-1"))
        except (ValueError, ValidationError):  # JSON errors are ValueErrors
            return None
        return request, key


async def _read_body(receive: Receive, length: int) -> tuple[bytes | None, Receive]:
    """The whole body (None if it did not match its length) and a ``receive`` that hands
    it to the next app as if unread."""
    chunks: list[bytes] = []
    size = 0
    more = True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            chunks = []
            replay_messages: list[Message] = [message]
            break
        chunk = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        more = message.get("more_body", False)
        if size > length:
            break
    else:
        replay_messages = []
    body = b"".join(chunks)
    replay_messages = replay_messages or [{"type": "http.request", "body": body,
                                           "more_body": more}]

    async def replay() -> Message:
        if replay_messages:
            return replay_messages.pop(0)
        return await receive()

    return (body if size == length and not more and chunks else None), replay


async def _handle(app: Any, scope: Scope, receive: Receive, exc: Exception) -> Any:
    """The response the app's exception handlers give ``exc`` (as for the route)."""
    handlers = app.exception_handlers
    for cls in type(exc).__mro__:
        handler = handlers.get(cls)
        if handler is not None:
            return await handler(Request(scope, receive), exc)
    raise exc
