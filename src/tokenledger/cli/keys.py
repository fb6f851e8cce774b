"""``keys``: server API keys for the HTTP API (shown once, stored hashed)."""

from __future__ import annotations

from typing import Annotated

import typer

from tokenledger.cli.base import JsonOpt, app, console, fail, print_json, settings

keys_app = typer.Typer(no_args_is_help=True, help="Server API keys for the HTTP API.")
app.add_typer(keys_app, name="keys")


@keys_app.command("create")
def keys_create(
    scope: Annotated[str, typer.Option(help="producer | reader | admin")],
    name: Annotated[str | None, typer.Option(help="A label for the key.")] = None,
    json_: JsonOpt = False,
) -> None:
    """Create a key; it is shown once (only its hash is stored)."""
    from tokenledger.apikeys.service import create_key
    from tokenledger.db.uow import unit_of_work

    with unit_of_work(settings()) as uow:
        created = create_key(uow.session, scope, name)
    if json_:
        print_json({"id": created.info.id, "prefix": created.info.prefix,
                    "scope": created.info.scope, "name": created.info.name,
                    "key": created.key})
        return
    console().print(f"created {created.info.scope} key {created.info.prefix} "
                  f"(id {created.info.id}); store it now, it is not shown again:")
    console().print(created.key, highlight=False, soft_wrap=True)


@keys_app.command("list")
def keys_list(
    all_: Annotated[bool, typer.Option("--all", help="Include revoked keys.")] = False,
    json_: JsonOpt = False,
) -> None:
    """Keys by prefix and scope (never the keys themselves)."""
    from tokenledger.apikeys.service import list_keys
    from tokenledger.db.uow import unit_of_work

    with unit_of_work(settings()) as uow:
        keys = list_keys(uow.session, include_revoked=all_)
    if json_:
        print_json([{"id": k.id, "prefix": k.prefix, "scope": k.scope, "name": k.name,
                     "created_at": k.created_at.isoformat() if k.created_at else None,
                     "revoked_at": k.revoked_at.isoformat() if k.revoked_at else None}
                    for k in keys])
        return
    from rich.table import Table

    table = Table(title="API keys")
    for col in ("id", "prefix", "scope", "name", "created", "revoked"):
        table.add_column(col)
    for k in keys:
        table.add_row(str(k.id), k.prefix, k.scope, k.name or "",
                      k.created_at.isoformat()[:19] if k.created_at else "",
                      k.revoked_at.isoformat()[:19] if k.revoked_at else "")
    console().print(table)


@keys_app.command("revoke")
def keys_revoke(
    key: Annotated[str, typer.Argument(help="The key's prefix, id, or the key itself.")],
) -> None:
    """Revoke a key; API processes stop accepting it within a few seconds."""
    from tokenledger.apikeys.service import revoke_key
    from tokenledger.db.uow import unit_of_work

    with unit_of_work(settings()) as uow:
        info = revoke_key(uow.session, key)
    if info is None:
        fail(f"no such key: {key if len(key) <= 20 else key[:15] + '...'}")
    console().print(f"revoked {info.scope} key {info.prefix} (id {info.id})")
