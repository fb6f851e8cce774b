"""The HTTP API (FastAPI): the synchronous side of tokenledger for services in any language."""

from tokenledger.api.app import app_from_env, create_app

__all__ = ["app_from_env", "create_app"]
