"""``dlq``: the dead-letter store (list, re-drive, drop)."""

from __future__ import annotations

from typing import Annotated

import typer

from tokenledger.cli.base import JsonOpt, app, console, fail, print_json, settings

dlq_app = typer.Typer(no_args_is_help=True, help="The dead-letter store.")
app.add_typer(dlq_app, name="dlq")

IdsArg = Annotated[list[int] | None, typer.Argument(help="Dead-letter ids.")]
AllOpt = Annotated[bool, typer.Option("--all", help="Every dead letter.")]


@dlq_app.command("list")
def dlq_list(limit: Annotated[int, typer.Option(min=1, help="At most this many.")] = 50,
             json_: JsonOpt = False) -> None:
    """Dead letters, oldest first."""
    from tokenledger.db.uow import unit_of_work
    from tokenledger.queue.deadletters import list_dead_letters

    with unit_of_work(settings()) as uow:
        rows = list_dead_letters(uow.session, limit)
    if json_:
        print_json(rows)
        return
    from rich.table import Table

    table = Table(title=f"{len(rows)} dead letter(s)")
    for col in ("id", "key", "attempts", "last seen", "reason"):
        table.add_column(col)
    for r in rows:
        table.add_row(str(r["id"]), r["key"] or "-", str(r["attempts"]), r["last_seen"][:19],
                      r["reason"][:100])
    console().print(table)


def _ids(ids: list[int] | None, all_: bool) -> list[int] | None:
    if not ids and not all_:
        fail("name dead-letter ids, or pass --all")
    return None if all_ else ids


@dlq_app.command("retry")
def dlq_retry(ids: IdsArg = None, all_: AllOpt = False) -> None:
    """Publish dead letters again (the worker re-validates them) and remove them."""
    from tokenledger.db.uow import unit_of_work
    from tokenledger.queue.deadletters import redrive
    from tokenledger.queue.producer import Producer

    wanted = _ids(ids, all_)
    s = settings()
    producer = Producer(s)
    try:
        with unit_of_work(s) as uow:
            done = redrive(uow.session, producer, wanted)
    finally:
        producer.close()
    for letter_id, why in done.kept:
        console().print(f"kept dead letter {letter_id}: {why}")
    if done.sent or not done.missing:
        console().print(f"re-published {len(done.sent)} dead letter(s)")
    if done.missing:
        fail(f"no dead letter with id {', '.join(map(str, done.missing))} "
             "(`tokenledger dlq list` shows them)")


@dlq_app.command("drop")
def dlq_drop(ids: IdsArg = None, all_: AllOpt = False) -> None:
    """Delete dead letters for good."""
    from tokenledger.db.uow import unit_of_work
    from tokenledger.queue.deadletters import drop

    wanted = _ids(ids, all_)
    with unit_of_work(settings()) as uow:
        count = drop(uow.session, wanted)
    console().print(f"dropped {count} dead letter(s)")
