"""The HTTP API (FastAPI): the synchronous side of tokenledger for services in any
language. ``app`` builds it; one module per resource holds its routes."""

from __future__ import annotations

from typing import Any


def create_app(*args: Any, **kwargs: Any) -> Any:
    from tokenledger.api.app import create_app as create

    return create(*args, **kwargs)


def app_from_env() -> Any:
    from tokenledger.api.app import app_from_env as build

    return build()
