"""/api/token-process: the seed 002 start/end API over the atomic start and the end event.

The start is the API's hot path: a few hundred microseconds of database work, which
FastAPI's middlewares, routing, dependency resolution and validation used to double. The
app hands the start's requests to :class:`StartFastPath` before its own stack; it answers
the ordinary start itself, with the same pieces the route uses (the ``StartIn`` model, the
key cache, the start pool, the route's answer), and hands everything else to FastAPI
untouched, so every unusual request (a body or header that does not validate, a key not
in the cache, a key of another scope, another content type, a body without a length or a
large one) gets exactly the route's answer, error bodies included. FastAPI's own
instrumentation, when configured, sees only the starts that fall through.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header
from fastapi.responses import JSONResponse
from pydantic import TypeAdapter, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenledger.api.auth import HEADER, PRODUCE, refresh_soon, require
from tokenledger.api.deps import (
    AUTH_ERRORS,
    Api,
    camel_keys,
    invalid,
    publish_and_wait,
    respond,
)
from tokenledger.api.schemas import (
    EndIn,
    EndOut,
    Envelope,
    ErrorBody,
    ExtendOut,
    Key,
    StartIn,
    StartOut,
)
from tokenledger.db.uow import unit_of_work
from tokenledger.ledger.reports import get_account
from tokenledger.results import StartResult
from tokenledger.sdk.client import build_event, new_key
from tokenledger.tokenprocess.extend import ExtendRequest

START_PATH = "/api/token-process/start"
# A start's body is a few hundred bytes at most; a larger one is not ordinary.
MAX_FAST_BODY = 16 * 1024
ALLOWED_SCOPES = frozenset(PRODUCE) | {"admin"}
_KEY = TypeAdapter(Key)
_API_KEY = HEADER.encode()

router = APIRouter(prefix="/api/token-process", tags=["token process"], responses=AUTH_ERRORS)


@router.post("/start", response_model=Envelope[StartOut],
             dependencies=[Depends(require(*PRODUCE))],
             responses={409: {"model": ErrorBody, "description": "Key reused with other input"}},
             summary="Check the feature and the balance and hold the estimated cost")
async def start(body: StartIn, api: Api,
                idempotency_key: Annotated[Key | None, Header()] = None) -> JSONResponse:
    """One short transaction: lock the account, check plan and balance, place the hold.

    ``accessible`` carries the ``hold_id`` to pass to end; ``not-accessible`` carries the
    seed's message (`Insufficient tokens` or `Feature endpoint is not available in your
    package`). With an ``Idempotency-Key`` header a retried start returns the first answer.
    """
    r = await api.start_pool.start(body, idempotency_key)
    return JSONResponse(start_body(body.user_id, r))


def start_body(user_id: str, r: StartResult) -> dict[str, Any]:
    """A start's 200 answer in the seed's shape (the route's and the fast path's)."""
    accessible = r.status == "accessible"
    data: dict[str, Any] = {"user_id": user_id, "token": r.token, "status": r.status,
                            "message": r.message,
                            "cost": r.held if accessible else r.required,
                            "hold_id": r.hold_id}
    if r.expires_at is not None:
        data["expires_at"] = r.expires_at.isoformat()
    # Built by hand: this is the hot path, and the shape is fixed.
    return {"success": True,
            "message": "Token process started" if accessible
            else (r.message or "Not accessible"),
            "data": data}


@router.post("/end", response_model=Envelope[EndOut], dependencies=[Depends(require(*PRODUCE))],
             responses={202: {"model": Envelope[EndOut],
                              "description": "Accepted; the outcome is not stored yet"},
                        409: {"model": ErrorBody,
                              "description": "Refused: the hold is unknown, settled, or the "
                                             "key was used for another payload"}},
             summary="Report the tokens used; the worker prices and settles it")
def end(body: EndIn, api: Api,
        prefer: Annotated[str | None, Header(max_length=200)] = None,
        idempotency_key: Annotated[Key | None, Header()] = None) -> JSONResponse:
    """Publishes a ``token_process_end`` event and waits (bounded) for the stored outcome:
    ``cost``, the new ``token`` balance and ``returnable`` / ``not-returnable``.
    ``Prefer: respond-async`` answers 202 with the key at once."""
    with unit_of_work(api.settings) as uow:
        session = uow.session
        get_account(session, body.user_id)
        if body.feature_endpoint_id not in uow.catalog.features:
            invalid("body", "feature_endpoint_id",
                    f"unknown feature {body.feature_endpoint_id!r}")
    event = build_event({
        "type": "token_process_end", "key": body.key or idempotency_key or new_key(),
        "user_id": body.user_id, "feature_endpoint_id": body.feature_endpoint_id,
        "input_tokens": body.input_token, "output_tokens": body.output_token,
        **({"model": body.model} if body.model else {}),
        **({"hold_id": body.hold_id} if body.hold_id else {}),
        **({"metadata": body.metadata} if body.metadata else {}),
        **({} if body.usage_reported else {"usage_reported": False})})
    # The same event LedgerClient.token_process_end publishes; built here to know its hash.
    pending = {"user_id": body.user_id, "key": event.key, "status": "pending",
               "hold_id": body.hold_id}
    outcome = publish_and_wait(api, event, pending, prefer)
    if isinstance(outcome, JSONResponse):
        return outcome
    result = outcome.result
    if outcome.status == "applied":
        data = {"user_id": body.user_id, "key": event.key, "token": result.get("token"),
                "cost": result.get("cost"), "status": result.get("status", "returnable"),
                "message": result.get("message"), "hold_id": result.get("hold_id"),
                "outcome": result.get("outcome")}
        return respond(200, data, "Token process ended")
    if outcome.status == "dead_lettered" and outcome.reason == "account not found":
        return respond(404, {**pending, "status": outcome.status}, outcome.reason,
                       success=False)
    return respond(409, {**pending, "status": outcome.status, "message": outcome.reason},
                   outcome.reason or outcome.status, success=False)


@router.post("/extend", response_model=Envelope[ExtendOut],
             dependencies=[Depends(require(*PRODUCE))],
             responses={404: {"model": ErrorBody, "description": "Unknown hold"},
                        409: {"model": ErrorBody, "description": "Key reused with other input"}},
             summary="Grow an open hold while its stream runs")
def extend(body: ExtendRequest, api: Api,
           idempotency_key: Annotated[Key | None, Header()] = None) -> JSONResponse:
    """``by`` credits more, or enough for ``to_output_tokens`` (after ``input_tokens``),
    drawn under the account lock as a start draws. ``extended`` carries the new total
    ``held``; ``limit_reached`` what is still ``available`` (nothing was drawn);
    ``closed`` a hold already settled, released or expired. With an ``Idempotency-Key``
    header a retried extend returns the first answer."""
    result = api.client.extend(
        body.hold_id, body.by, to_output_tokens=body.to_output_tokens,
        input_tokens=body.input_tokens, key=idempotency_key)
    return respond(200, camel_keys(result.as_dict()), f"Hold {result.status}")


# -- the fast path -----------------------------------------------------------------------


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
        request, key = started
        try:
            result = await api.start_pool.start(request, key)
        except Exception as exc:  # noqa: BLE001 - answered by the app's handlers
            from tokenledger.api.errors import handle

            scope["app"] = self.app
            response = await handle(self.app, scope, receive, exc)
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
        if api is None:
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
