"""Commands for the HTTP API: ``api`` (uvicorn) and ``keys create|list|revoke``."""

from __future__ import annotations

import importlib.util
from typing import Annotated

import typer
from rich.table import Table

from tokenledger.cli import app, console, fail, print_json, settings
from tokenledger.db import unit_of_work

keys_app = typer.Typer(no_args_is_help=True, help="Server API keys for the HTTP API.")
app.add_typer(keys_app, name="keys")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


@app.command()
def api(
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind.")] = 8000,
    workers: Annotated[int, typer.Option(min=1, max=64, help="Worker processes.")] = 1,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
    access_log: Annotated[bool, typer.Option(help="Log every request.")] = False,
) -> None:
    """Serve the HTTP API (OpenAPI at /docs) with uvicorn; uvloop/httptools when present."""
    import uvicorn

    settings()  # fail early, in one line, on a bad environment
    fast = importlib.util.find_spec("uvloop") is not None
    uvicorn.run(
        "tokenledger.api:app_from_env", factory=True, host=host, port=port, workers=workers,
        log_level=log_level, access_log=access_log,
        log_config=None,  # our JSON handler (app_from_env) is the only one
        loop="uvloop" if fast else "asyncio",
        http="httptools" if importlib.util.find_spec("httptools") else "h11",
        proxy_headers=True, server_header=False,
        # A busy host can take more than uvicorn's default 5 s to import a worker.
        timeout_worker_healthcheck=30,
    )


@keys_app.command("create")
def keys_create(
    scope: Annotated[str, typer.Option(help="producer | reader | admin")],
    name: Annotated[str | None, typer.Option(help="A label for the key.")] = None,
    json_: JsonOpt = False,
) -> None:
    """Create a key; it is shown once (only its hash is stored)."""
    from tokenledger.apikeys import create_key

    with unit_of_work(settings().database_url) as session:
        created = create_key(session, scope, name)
    if json_:
        print_json({"id": created.info.id, "prefix": created.info.prefix,
                    "scope": created.info.scope, "name": created.info.name,
                    "key": created.key})
        return
    console.print(f"created {created.info.scope} key {created.info.prefix} "
                  f"(id {created.info.id}); store it now, it is not shown again:")
    console.print(created.key, highlight=False, soft_wrap=True)


@keys_app.command("list")
def keys_list(
    all_: Annotated[bool, typer.Option("--all", help="Include revoked keys.")] = False,
    json_: JsonOpt = False,
) -> None:
    """Keys by prefix and scope (never the keys themselves)."""
    from tokenledger.apikeys import list_keys

    with unit_of_work(settings().database_url) as session:
        keys = list_keys(session, include_revoked=all_)
    if json_:
        print_json([{"id": k.id, "prefix": k.prefix, "scope": k.scope, "name": k.name,
                     "created_at": k.created_at.isoformat() if k.created_at else None,
                     "revoked_at": k.revoked_at.isoformat() if k.revoked_at else None}
                    for k in keys])
        return
    table = Table(title="API keys")
    for col in ("id", "prefix", "scope", "name", "created", "revoked"):
        table.add_column(col)
    for k in keys:
        table.add_row(str(k.id), k.prefix, k.scope, k.name or "",
                      k.created_at.isoformat()[:19] if k.created_at else "",
                      k.revoked_at.isoformat()[:19] if k.revoked_at else "")
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(
    key: Annotated[str, typer.Argument(help="The key's prefix, id, or the key itself.")],
) -> None:
    """Revoke a key; API processes stop accepting it within a few seconds."""
    from tokenledger.apikeys import revoke_key

    with unit_of_work(settings().database_url) as session:
        info = revoke_key(session, key)
    if info is None:
        fail(f"no such key: {key if len(key) <= 20 else key[:15] + '...'}")
    console.print(f"revoked {info.scope} key {info.prefix} (id {info.id})")
