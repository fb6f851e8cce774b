"""Commands for the token process: start, publish end, holds, and catalog load."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from tokenledger.cli import app, console, fail, print_json, settings
from tokenledger.cli.ledger_cmds import (
    JsonOpt,
    WaitOpt,
    _publish_and_report,
    catalog_app,
    publish_app,
)
from tokenledger.client import event_fields
from tokenledger.db import unit_of_work

holds_app = typer.Typer(no_args_is_help=True, help="Token-process holds.")
app.add_typer(holds_app, name="holds")



@app.command()
def start(
    user_id: str,
    feature: str,
    max_output_tokens: Annotated[int | None, typer.Option(
        min=0, help="Price the hold from this many output tokens.")] = None,
    hold: Annotated[int | None, typer.Option(min=0, help="Hold exactly this many.")] = None,
    model: Annotated[str | None, typer.Option(help="Model to price with.")] = None,
    key: Annotated[str | None, typer.Option(help="Idempotency key for the start.")] = None,
    json_: JsonOpt = False,
) -> None:
    """Start a token process: check access and balance and place a hold (exit 1 if refused)."""
    from tokenledger import LedgerClient

    with LedgerClient(settings()) as client:
        result = client.token_process_start(user_id, feature, max_output_tokens=max_output_tokens,
                                            hold=hold, model=model, key=key)
    if json_:
        print_json(result.as_dict())
    elif result.accessible:
        console.print(f"[green]accessible[/green]: hold {result.hold_id} of {result.held} "
                      f"token(s) until {result.expires_at:%Y-%m-%d %H:%M:%S} UTC; "
                      f"{result.token} available", highlight=False)
    else:
        console.print(f"[red]not-accessible[/red]: {result.message}; {result.token} available"
                      + (f", {result.required} required" if result.required is not None
                         else ""), highlight=False)
    if not result.accessible:
        raise typer.Exit(1)


@publish_app.command("end")
def publish_end(
    user_id: str,
    feature: str,
    input_tokens: Annotated[int, typer.Option(min=0)],
    output_tokens: Annotated[int, typer.Option(min=0)],
    model: Annotated[str | None, typer.Option()] = None,
    hold_id: Annotated[int | None, typer.Option(min=1)] = None,
    key: Annotated[str | None, typer.Option()] = None,
    wait: WaitOpt = 10.0,
) -> None:
    """End a token process: the worker prices the usage and settles the hold."""
    _publish_and_report(event_fields(type="token_process_end", user_id=user_id,
                                 feature_endpoint_id=feature, input_tokens=input_tokens,
                                 output_tokens=output_tokens, model=model, hold_id=hold_id,
                                 key=key), wait)


@catalog_app.command("load")
def catalog_load(
    file: Annotated[Path, typer.Argument(help="A catalog TOML file.")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate only.")] = False,
) -> None:
    """Validate a catalog file and make it the catalog; a bad file changes nothing."""
    from tokenledger.catalog import (
        catalog_changes,
        current_catalog,
        load_catalog,
        parse_catalog,
        read_catalog_source,
    )
    from tokenledger.errors import CatalogError

    try:
        text, source = read_catalog_source(file)
        spec = parse_catalog(text, source)
        with unit_of_work(settings().database_url) as session:
            try:
                old = current_catalog(session)
            except CatalogError:
                old = None
            changes = catalog_changes(old, spec)
            version = None if dry_run else load_catalog(session, text, source)
    except CatalogError as exc:
        fail(f"catalog refused, the current one stays: {exc}")
    for section, diff in changes.items():
        parts = [f"{label} {', '.join(names)}" for label, names in diff.items() if names]
        console.print(f"  {section}: " + ("; ".join(parts) if parts else "unchanged"),
                      highlight=False)
    if version is None:
        console.print(f"[green]valid[/green]: {source} (dry run, nothing stored)")
    else:
        console.print(f"[green]catalog version {version} loaded[/green] from {source}; "
                      "workers switch to it on their next batch", highlight=False)


@holds_app.command("list")
def holds_list(
    user_id: Annotated[str | None, typer.Argument(help="Only this user's holds.")] = None,
    status: Annotated[str | None, typer.Option(
        help="open, settled, released, expired (default open); 'all' for every one.")] = "open",
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 50,
    json_: JsonOpt = False,
) -> None:
    """Holds, newest first."""
    from tokenledger.tokenprocess.models import HOLD_STATUSES
    from tokenledger.tokenprocess.service import open_holds

    if status not in (*HOLD_STATUSES, "all"):
        fail(f"--status must be one of {', '.join(HOLD_STATUSES)} or all")
    with unit_of_work(settings().database_url) as session:
        rows = open_holds(session, user_id, status=None if status == "all" else status,
                          limit=limit)
    if json_:
        print_json(rows)
        return
    table = Table(title=f"{len(rows)} hold(s)")
    for col in ("id", "user", "feature", "amount", "status", "expires", "resolved by"):
        table.add_column(col)
    for r in rows:
        table.add_row(str(r["id"]), r["user_id"], r["feature"], str(r["amount"]), r["status"],
                      r["expires_at"][:19], r["resolved_by"] or "-")
    console.print(table)


@holds_app.command("expire")
def holds_expire(limit: Annotated[int, typer.Option(min=1)] = 1000) -> None:
    """Release every hold past its expiry now (beat does this every minute)."""
    from tokenledger import notify
    from tokenledger.catalog import current_catalog
    from tokenledger.timeutil import utcnow
    from tokenledger.tokenprocess.service import release_expired_holds

    s = settings()
    holds = credits = 0
    while True:
        now = utcnow()
        with unit_of_work(s.database_url) as session:
            catalog = current_catalog(session)
            report = release_expired_holds(session, now, limit=limit, catalog=catalog)
            if report.balance_changes:
                notify.stage(session, s, report.balance_changes, catalog, now)
        holds += report.holds
        credits += report.credits
        if report.accounts < limit:
            break
    console.print(f"released {holds} expired hold(s), {credits} credit(s) back")
