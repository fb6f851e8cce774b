"""``conflicts``: keys reused with another payload, recorded and never applied."""

from __future__ import annotations

from typing import Annotated

import typer

from tokenledger.cli.base import JsonOpt, app, console, print_json, settings

conflicts_app = typer.Typer(no_args_is_help=True,
                            help="Keys reused with another payload (never applied).")
app.add_typer(conflicts_app, name="conflicts")


@conflicts_app.command("list")
def conflicts_list(
    before: Annotated[int | None, typer.Option(
        min=1, help="Only conflicts older than this id (paging).")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="At most this many.")] = 50,
    json_: JsonOpt = False,
) -> None:
    """Recorded conflicts, newest first, each beside the outcome its key stored: the
    publish that lost never reached the ledger, so this is the only place it shows."""
    from tokenledger.dashboard.queries import conflicts
    from tokenledger.db.uow import unit_of_work

    with unit_of_work(settings()) as uow:
        rows, _ = conflicts(uow.session, before, limit)
    for row in rows:
        row.pop("payload_json")
    if json_:
        print_json(rows)
        return
    from rich.table import Table

    table = Table(title=f"{len(rows)} conflict(s)")
    for col in ("id", "key", "seen", "payload", "stored outcome"):
        table.add_column(col)
    for r in rows:
        stored = r["stored"] or {}
        table.add_row(str(r["id"]), r["key"], r["seen_at"].isoformat()[:19],
                      str(r["payload"])[:80], stored.get("outcome", "-"))
    console().print(table)
