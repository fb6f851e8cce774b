"""/api/events: publish one event or a batch (202 with the keys); read a key's outcome."""

from __future__ import annotations

import copy
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Path
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import TypeAdapter, ValidationError

from tokenledger.api.auth import PRODUCE, READ_EVENTS, require
from tokenledger.api.deps import AUTH_ERRORS, Api, lookup, respond
from tokenledger.api.schemas import AcceptedOut, Envelope, ErrorBody, EventOutcomeOut
from tokenledger.errors import NotFound
from tokenledger.messages import MAX_BATCH, Event, check_json, clean_text
from tokenledger.sdk.client import new_key

router = APIRouter(prefix="/api/events", tags=["events"], responses=AUTH_ERRORS)
_event: TypeAdapter[Any] = TypeAdapter(Event)


def _schema() -> dict[str, Any]:
    """The request body's JSON schema: one event, or a list of 1 to 1,000 (keys optional)."""
    one = copy.deepcopy(_event.json_schema(ref_template="#/components/schemas/{model}"))
    defs = one.pop("$defs", {})
    for definition in defs.values():
        if "key" in definition.get("required", []):
            definition["required"].remove("key")
    return {"defs": defs, "body": {"oneOf": [one, {"type": "array", "items": one,
                                                   "minItems": 1, "maxItems": MAX_BATCH}]}}


_SCHEMA = _schema()


def _validate(raw: Any) -> list[Any]:
    """Every event checked before any is published; 422 lists each bad field by index."""
    if isinstance(raw, dict):
        items, batch = [raw], False
    elif isinstance(raw, list):
        items, batch = raw, True
        if not raw or len(raw) > MAX_BATCH:
            raise RequestValidationError([{
                "loc": ("body",), "type": "too_long" if raw else "too_short",
                "msg": f"a batch holds 1 to {MAX_BATCH} events, got {len(raw)}"}])
    else:
        raise RequestValidationError([{
            "loc": ("body",), "type": "model_type",
            "msg": "the request body must be an event object or a list of them"}])
    events, errors = [], []
    for i, item in enumerate(items):
        where: tuple[Any, ...] = ("body", i) if batch else ("body",)
        if not isinstance(item, dict):
            errors.append({"loc": where, "type": "model_type",
                           "msg": "expected an event object"})
            continue
        try:
            check_json(item)
            for name in ("key", "user_id"):
                if isinstance(item.get(name), str):
                    clean_text(item[name])
        except ValueError as exc:
            errors.append({"loc": where, "type": "value_error", "msg": str(exc)})
            continue
        try:
            events.append(_event.validate_python({"key": new_key(), **item}))
        except ValidationError as exc:
            for e in exc.errors(include_url=False):
                loc = [p for p in e["loc"] if p not in _TAGS]
                msg = e["msg"]
                if e["type"] in ("union_tag_invalid", "union_tag_not_found"):
                    loc = ["type"]
                if e["type"] == "union_tag_not_found":
                    msg = f"Field required: one of {', '.join(_TAGS)}"
                errors.append({"loc": (*where, *loc), "type": e["type"], "msg": msg})
    if errors:
        raise RequestValidationError(errors)
    return events


_TAGS = ("open_account", "charge", "credit", "refund", "token_process_end")


@router.post("", status_code=202, response_model=Envelope[AcceptedOut],
             dependencies=[Depends(require(*PRODUCE))],
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/json": {"schema": _SCHEMA["body"]}}}},
             summary="Publish one event or a batch of up to 1,000; answers 202 with the keys")
def publish(api: Api, body: Annotated[Any, Body()] = None) -> JSONResponse:
    """Events are validated here (a bad one names its index and field and nothing is
    published), then handed to the workers. A missing ``key`` is generated."""
    events = _validate(body)
    keys = api.client.publish_many(events)
    return respond(202, {"keys": keys, "count": len(keys)},
                   "Accepted; GET /api/events/{key} for each outcome")


@router.get("/{key:path}", response_model=Envelope[EventOutcomeOut],
            dependencies=[Depends(require(*READ_EVENTS))],
            responses={404: {"model": ErrorBody, "description": "No event with this key"}},
            summary="An event's stored outcome, or `pending` while it is on its way")
def outcome(api: Api, key: Annotated[str, Path(min_length=1, max_length=255)]) -> JSONResponse:
    """``pending`` only for a key the broker's in-flight record holds; a key that has
    neither an outcome nor a message on its way was never published (404)."""
    try:
        clean_text(key)
    except ValueError as exc:
        raise RequestValidationError([{"loc": ("path", "key"), "type": "value_error",
                                       "msg": str(exc)}]) from None
    found = lookup(api.settings, key)
    if found.status == "pending" and api.client.producer.pending(key) is False:
        # The worker may have committed and cleared the record since the first look.
        found = lookup(api.settings, key)
        if found.status == "pending":
            raise NotFound(f"No event with key {key!r}: it was never published (or its "
                           "outcome is no longer kept)")
    return respond(200, {"key": key, "status": found.status, "reason": found.reason,
                         "result": found.result})


def openapi_components() -> dict[str, Any]:
    """Schemas the events body refers to, for the app's OpenAPI document."""
    return _SCHEMA["defs"]
