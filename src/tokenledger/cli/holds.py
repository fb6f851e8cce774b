"""``holds``: token-process holds, and releasing the expired ones."""

from __future__ import annotations

from typing import Annotated

import typer

from tokenledger.cli.base import JsonOpt, app, console, fail, print_json, settings

holds_app = typer.Typer(no_args_is_help=True, help="Token-process holds.")
app.add_typer(holds_app, name="holds")


@holds_app.command("list")
def holds_list(
    user_id: Annotated[str | None, typer.Argument(help="Only this user's holds.")] = None,
    status: Annotated[str | None, typer.Option(
        help="open, settled, released, expired (default open); 'all' for every one.")] = "open",
    limit: Annotated[int, typer.Option(min=1, max=1000, help="At most this many.")] = 50,
    json_: JsonOpt = False,
) -> None:
    """Holds, newest first."""
    from tokenledger.db.uow import unit_of_work
    from tokenledger.tokenprocess.models import HOLD_STATUSES
    from tokenledger.tokenprocess.service import open_holds

    if status not in (*HOLD_STATUSES, "all"):
        fail(f"--status must be one of {', '.join(HOLD_STATUSES)} or all")
    with unit_of_work(settings()) as uow:
        rows = open_holds(uow.session, user_id, status=None if status == "all" else status,
                          limit=limit)
    if json_:
        print_json(rows)
        return
    from rich.table import Table

    table = Table(title=f"{len(rows)} hold(s)")
    for col in ("id", "user", "feature", "amount", "status", "expires", "resolved by"):
        table.add_column(col)
    for r in rows:
        table.add_row(str(r["id"]), r["user_id"], r["feature"], str(r["amount"]), r["status"],
                      r["expires_at"][:19], r["resolved_by"] or "-")
    console().print(table)


@holds_app.command("release")
def holds_release(
    hold_id: Annotated[int, typer.Argument(min=1, help="The hold's id (holds list).")],
    wait: Annotated[float, typer.Option(help="Seconds to wait for the release.")] = 10.0,
    json_: JsonOpt = False,
) -> None:
    """Release an open hold now: its credits go back and nothing is charged (an end of
    its token process with 0 tokens, so the worker releases it as any end would)."""
    from tokenledger.cli.publish import fields, publish_and_report
    from tokenledger.db.uow import unit_of_work
    from tokenledger.tokenprocess.models import OPEN
    from tokenledger.tokenprocess.service import find_hold

    with unit_of_work(settings()) as uow:
        hold = find_hold(uow.session, hold_id)
    if hold["status"] != OPEN:
        by = f" by {hold['resolved_by']}" if hold["resolved_by"] else ""
        fail(f"hold #{hold_id} is already {hold['status']}{by}")
    publish_and_report(fields(type="token_process_end", user_id=hold["user_id"],
                              feature_endpoint_id=hold["feature"], input_tokens=0,
                              output_tokens=0, hold_id=hold_id, key=f"release:{hold_id}"),
                       wait, json_)


@holds_app.command("expire")
def holds_expire(limit: Annotated[int, typer.Option(min=1, help="Accounts per transaction.")]
                 = 1000) -> None:
    """Release every hold past its expiry now (beat does this every minute)."""
    from tokenledger.db.uow import unit_of_work
    from tokenledger.tokenprocess.service import release_expired_holds

    s = settings()
    holds = credits = 0
    while True:
        with unit_of_work(s) as uow:
            report = release_expired_holds(uow, limit=limit)
        holds += report.holds
        credits += report.credits
        if report.accounts < limit:
            break
    console().print(f"released {holds} expired hold(s), {credits} credit(s) back")
