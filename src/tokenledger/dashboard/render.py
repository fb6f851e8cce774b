"""Rendering pages: the Jinja environment (every value escaped), the filters templates
use, and the response every page is sent with (security headers, no caching, and how
long the server took in a ``Server-Timing`` header)."""

from __future__ import annotations

import time
from datetime import datetime
from decimal import Decimal
from functools import cache
from typing import Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

from fastapi import Request
from fastapi.responses import HTMLResponse, Response
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

# Pages load nothing from elsewhere and run no inline script; no page may be framed but
# the badge's.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors {frames}")
TIMING_STATE = "dashboard_started"


async def start_clock(request: Request) -> None:
    """A router dependency: note when the request reached the dashboard."""
    setattr(request.state, TIMING_STATE, time.perf_counter())


def when(value: datetime | str | None, tz: str | None = None, seconds: bool = False) -> str:
    """A timestamp as ``YYYY-MM-DD HH:MM`` in ``tz`` (UTC by default)."""
    if value is None or value == "":
        return "-"
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    zone = ZoneInfo(tz or "UTC")
    return value.astimezone(zone).strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M")


def credits(value: int | float | Decimal | None) -> str:
    """A whole number with thousands separators (``-`` for none)."""
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.4f}".rstrip("0").rstrip(".")


def signed(value: int) -> str:
    """A number with its sign and thousands separators."""
    return f"{value:+,}"


def query(base: str, **params: Any) -> str:
    """``base`` with the given query parameters (those that are None or empty left out)."""
    kept = {k: v for k, v in params.items() if v is not None and v != ""}
    return f"{base}?{urlencode(kept)}" if kept else base


@cache
def environment() -> Environment:
    """The templates' environment (once per process): every value escaped."""
    env = Environment(loader=PackageLoader("tokenledger.dashboard", "templates"),
                      autoescape=select_autoescape(["html", "svg"], default=True),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(when=when, credits=credits, signed=signed)
    env.globals.update(query=query)
    return env


def page(request: Request, template: str, context: dict[str, Any], status: int = 200,
         frames: str = "'none'") -> Response:
    """Render ``template`` with ``context`` into a response with the dashboard's headers."""
    html = environment().get_template(template).render(**context)
    response = HTMLResponse(html, status_code=status)
    secure(response, frames)
    return timed(request, response)


def timed(request: Request, response: Response) -> Response:
    """Say in ``Server-Timing`` how long the server spent on this request so far."""
    started = getattr(request.state, TIMING_STATE, None)
    if started is not None:
        elapsed = (time.perf_counter() - started) * 1000
        response.headers["Server-Timing"] = f"app;dur={elapsed:.1f}"
    return response


def secure(response: Any, frames: str = "'none'") -> None:
    """The headers every dashboard answer carries: its content is private, links hold
    tokens (no Referer), and the page may load only its own assets."""
    response.headers["Content-Security-Policy"] = CSP.format(frames=frames)
    response.headers["Cache-Control"] = "no-store"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Content-Type-Options"] = "nosniff"
