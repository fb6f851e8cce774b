"""Structured logs: one JSON object per line, with secrets masked before they are written.

Every tokenledger process (worker, beat, CLI, API) calls :func:`configure_logging` once at
its edge. Context that belongs to a whole unit of work (the Celery task id, the event key)
is bound with :func:`log_context` and added to every line logged inside it.

Named ``logs`` rather than ``logging`` so it never shadows the standard library.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from types import MappingProxyType
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

MASK = "***"

# Keys whose values are never written, wherever they appear in a line's fields.
SECRET_FIELDS = frozenset({
    "password", "passwd", "pwd", "secret", "api_key", "apikey", "x-server-api-key",
    "x_server_api_key", "authorization", "cookie", "set-cookie", "basic_auth",
    "flower_basic_auth", "token_secret", "client_secret", "private_key", "access_token",
    "refresh_token",
})

# user:password@ in any URL-looking text (postgres, redis, amqp, http...).
_URL_PASSWORD = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<user>[^:/@\s]*):"
                           r"(?P<pw>[^@/\s]+)@")
# "x-server-api-key: abc", "api_key=abc", "password='abc'", "Authorization: Basic abc"
_KEY_VALUE = re.compile(
    r"(?P<k>x-server-api-key|api[_-]?key|password|passwd|secret|authorization|basic[_-]auth)"
    r"(?P<sep>['\"]?\s*[:=]\s*['\"]?)(?P<v>(?:basic |bearer )?[^\s'\",;&]+)",
    re.IGNORECASE,
)

# A dashboard link's token in a path (an access log line): whoever reads it could open the
# page until the link expires.
_LINK_TOKEN = re.compile(r"(?P<path>/dashboard/u/)v1\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+")

_context: ContextVar[Mapping[str, Any]] = ContextVar("tokenledger_log_context",
                                                 default=MappingProxyType({}))

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime", "taskName",
}


def mask_url(url: str | None) -> str | None:
    """The URL with any password replaced by ``***`` (safe to log or print)."""
    if not url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return scrub(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    userinfo = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{userinfo}:{MASK}@{netloc[1]}"))


def scrub(text: str) -> str:
    """Mask passwords in URLs, dashboard link tokens and obvious ``key: value`` secrets
    inside free text."""
    if "://" in text:
        text = _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
    if "/dashboard/u/" in text:
        text = _LINK_TOKEN.sub(lambda m: f"{m['path']}{MASK}", text)
    return _KEY_VALUE.sub(lambda m: f"{m['k']}{m['sep']}{MASK}", text)


def scrub_fields(value: Any) -> Any:
    """A copy of ``value`` with secret-named keys masked and strings scrubbed, recursively."""
    if isinstance(value, Mapping):
        return {k: (MASK if str(k).lower() in SECRET_FIELDS and v is not None
                    else scrub_fields(v)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [scrub_fields(v) for v in value]
    if isinstance(value, str):
        return scrub(value)
    return value


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Add ``fields`` to every line logged inside the block (this thread/task only)."""
    token = _context.set({**_context.get(), **{k: v for k, v in fields.items()
                                               if v is not None}})
    try:
        yield
    finally:
        _context.reset(token)


def bind(**fields: Any) -> None:
    """Add ``fields`` to the current context until the enclosing ``log_context`` ends."""
    _context.set({**_context.get(), **fields})


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, context and extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
                  .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": scrub(record.getMessage()),
            "pid": record.process,
        }
        data.update(_context.get())
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRS and not key.startswith("_"):
                data[key] = value
        if record.exc_info:
            data["exc_type"] = record.exc_info[0].__name__ if record.exc_info[0] else None
            data["exc"] = scrub("".join(traceback.format_exception(*record.exc_info)))
        elif record.stack_info:
            data["stack"] = scrub(record.stack_info)
        return json.dumps(scrub_fields(data), default=str, ensure_ascii=False,
                          separators=(",", ":"))


class PlainFormatter(logging.Formatter):
    """Human-readable lines for a terminal, with the same masking as the JSON lines."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = scrub(super().format(record))
        extra = {**_context.get(), **{k: v for k, v in record.__dict__.items()
                                      if k not in _RECORD_ATTRS and not k.startswith("_")}}
        if extra:
            line += " " + " ".join(f"{k}={v}" for k, v in scrub_fields(extra).items())
        return line


def configure_logging(level: str | int = "INFO", json_lines: bool = True,
                      stream: IO[str] | None = None) -> None:
    """Route every logger (and Python warnings) to one handler writing JSON lines.

    Safe to call more than once: the previous tokenledger handler is replaced.
    """
    if isinstance(level, str):
        level = logging.getLevelName(level.upper())
        if not isinstance(level, int):
            level = logging.INFO
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.set_name("tokenledger")
    handler.setFormatter(JsonFormatter() if json_lines else PlainFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # Libraries that keep their own handlers would print non-JSON lines beside ours.
    for name in ("celery", "kombu", "amqp", "uvicorn", "uvicorn.error", "uvicorn.access",
                 "tornado", "tornado.access", "tornado.application", "tornado.general"):
        lib = logging.getLogger(name)
        lib.handlers.clear()
        lib.propagate = True
    logging.getLogger("sqlalchemy.engine").setLevel(logging.WARNING)
    logging.captureWarnings(True)
