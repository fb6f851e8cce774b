"""The wire format of a task message: Celery's protocol 2, JSON only.

This is what any producer puts on the queue (``README``, "Publishing from any language"):
a task name, one argument list, and a few headers. tokenledger's producer builds it here
(once per message: the events of many callers may share one), so a publish costs a
``json.dumps`` and a base64, not Celery's generic machinery.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import time
import uuid
from collections.abc import Sequence
from typing import Any

CONTENT_TYPE = "application/json"
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
_ORIGIN = f"tokenledger@{socket.gethostname()}:{os.getpid()}"
_ENCODER = json.JSONEncoder(separators=(",", ":"), default=str)


def new_id() -> str:
    return str(uuid.uuid4())


def task_body(args: Sequence[Any], kwargs: dict[str, Any] | None = None) -> bytes:
    """The body of a protocol-2 message: ``[args, kwargs, embed]`` as JSON."""
    return _ENCODER.encode([list(args), kwargs or {}, _EMBED]).encode()


def headers(task: str, task_id: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Protocol-2 headers for a task message (``published_at`` lets workers measure
    publish -> commit; it is not part of any event)."""
    out: dict[str, Any] = {
        "lang": "py", "task": task, "id": task_id, "root_id": task_id, "parent_id": None,
        "group": None, "retries": 0, "eta": None, "expires": None,
        "timelimit": [None, None], "shadow": None, "origin": _ORIGIN,
        "argsrepr": "", "kwargsrepr": "{}", "ignore_result": True,
        "published_at": time.time(),
    }
    if extra:
        out.update(extra)
    return out


def redis_envelope(task: str, queue: str, args: Sequence[Any],
                   kwargs: dict[str, Any] | None = None, *, task_id: str | None = None,
                   extra_headers: dict[str, Any] | None = None) -> tuple[str, str]:
    """(task id, message) as kombu's Redis transport keeps it in the queue's list."""
    task_id = task_id or new_id()
    message = {
        "body": base64.b64encode(task_body(args, kwargs)).decode(),
        "content-encoding": "utf-8", "content-type": CONTENT_TYPE,
        "headers": headers(task, task_id, extra_headers),
        "properties": {
            "correlation_id": task_id, "reply_to": "", "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue}, "priority": 0,
            "body_encoding": "base64", "delivery_tag": new_id(),
        },
    }
    return task_id, _ENCODER.encode(message)


def events_of(raw: str | bytes) -> list[Any]:
    """The events a Redis-transport message carries (for the reconciler): the first
    argument of its body, as a list. Raises ValueError when it is not such a message."""
    try:
        message = json.loads(raw)
        body = base64.b64decode(message["body"]) if \
            message.get("properties", {}).get("body_encoding") == "base64" else message["body"]
        args = json.loads(body)[0]
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise ValueError(f"not a task message: {exc}") from None
    payload = args[0] if args else None
    return payload if isinstance(payload, list) else [payload]
