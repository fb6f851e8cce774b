"""``renew``: daily resets, monthly renewals and wallet expiry, run now."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from tokenledger.cli.base import JsonOpt, app, console, print_json, settings

renew_app = typer.Typer(no_args_is_help=True,
                        help="Daily resets, monthly renewals and wallet expiry.")
app.add_typer(renew_app, name="renew")

INLINE_UP_TO = 5000  # accounts: smaller runs are processed by the CLI itself by default

TierOpt = Annotated[str | None, typer.Option(help="Only this plan (tier).")]
LimitOpt = Annotated[int | None, typer.Option(min=1, help="At most this many accounts.")]
DryOpt = Annotated[bool, typer.Option("--dry-run", help="Report what would change; write "
                                      "nothing to the ledger.")]
StopOpt = Annotated[bool, typer.Option("--stop-on-error",
                                       help="Stop at the first failing account (default: "
                                       "continue and report every error).")]
InlineOpt = Annotated[bool | None, typer.Option(
    "--inline/--workers", help="Process chunks in this process, or fan them out to the "
    f"workers (default: inline up to {INLINE_UP_TO} accounts).", show_default=False)]
WaitOpt = Annotated[bool, typer.Option("--wait/--no-wait",
                                       help="Wait for the workers and show progress.")]
ChunkOpt = Annotated[int | None, typer.Option(min=1, max=50_000,
                                              help="Accounts per chunk.")]


@renew_app.command("daily")
def renew_daily(tier: TierOpt = None, limit: LimitOpt = None, dry_run: DryOpt = False,
                stop_on_error: StopOpt = False, json_: JsonOpt = False,
                inline: InlineOpt = None, wait: WaitOpt = True,
                chunk_size: ChunkOpt = None) -> None:
    """Reset daily plans' STANDARD wallets for accounts whose local day has turned."""
    _renew("daily", tier, limit, dry_run, stop_on_error, json_, inline, wait, chunk_size)


@renew_app.command("monthly")
def renew_monthly(tier: TierOpt = None, limit: LimitOpt = None, dry_run: DryOpt = False,
                  stop_on_error: StopOpt = False, json_: JsonOpt = False,
                  inline: InlineOpt = None, wait: WaitOpt = True,
                  chunk_size: ChunkOpt = None) -> None:
    """Renew 30-day plans whose last renewal is at least 30 days old."""
    _renew("monthly", tier, limit, dry_run, stop_on_error, json_, inline, wait, chunk_size)


def _renew(kind: str, tier: str | None, limit: int | None, dry_run: bool,
           stop_on_error: bool, json_: bool, inline: bool | None, wait: bool,
           chunk_size: int | None) -> None:
    from tokenledger.db.uow import unit_of_work
    from tokenledger.renewals import runs as runner
    from tokenledger.renewals.service import RunOptions, run_report

    s = settings()
    options = RunOptions(kind=kind, tier=tier, limit=limit, dry_run=dry_run,
                         continue_on_error=not stop_on_error,
                         chunk_size=chunk_size or s.renewal_chunk_size, trigger="cli")
    run_id, chunk_ids = runner.start_run(s, options)
    with unit_of_work(s) as uow:
        planned = run_report(uow.session, run_id, changes_limit=0)
    if inline is None:
        inline = planned["candidates"] <= INLINE_UP_TO
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    progress = Progress(TextColumn(f"{kind} run {run_id}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("accounts · {task.fields[ok]} ok · {task.fields[bad]} "
                                   "failed"), TimeElapsedColumn(), console=console(),
                        disable=json_ or not chunk_ids, transient=False)
    with progress:
        bar = progress.add_task("run", total=planned["candidates"], ok=0, bad=0)
        if inline:
            done = {"ok": 0, "bad": 0, "n": 0}

            def advance(result: Any) -> None:
                done["ok"] += result.successful
                done["bad"] += result.failed
                done["n"] += result.processed + result.skipped
                progress.update(bar, completed=done["n"], ok=done["ok"], bad=done["bad"])

            runner.execute_inline(s, chunk_ids, on_chunk=advance)
        else:
            runner.dispatch(s, chunk_ids)
            if not wait:
                console().print(f"{kind} run {run_id}: {len(chunk_ids)} chunk(s) sent to the "
                              f"workers; follow it with `tokenledger renew show {run_id}`")
                return

            def show(report: dict[str, Any]) -> None:
                progress.update(bar, completed=report["total_processed"] + report["skipped"],
                                ok=report["successful"], bad=report["failed"])

            runner.wait_for_run(s, run_id, on_progress=show)
    with unit_of_work(s) as uow:
        report = run_report(uow.session, run_id)
    _show_report(report, json_)
    if report["failed"] or report["status"] in ("failed", "stopped"):
        raise typer.Exit(1)


def _show_report(report: dict[str, Any], json_: bool) -> None:
    if json_:
        print_json(report)
        return
    title = (f"{report['kind']} run {report['id']}"
             + (" (dry run: nothing written)" if report["dry_run"] else ""))
    from rich.table import Table

    table = Table(title=title, show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    colour = {"completed": "green", "running": "yellow"}.get(report["status"], "red")
    rows = [
        ("status", f"[{colour}]{report['status']}[/{colour}]"),
        ("as of", report["as_of"]),
        ("tier", report["tier"] or "all"),
        ("limit", str(report["limit"] or "-")),
        ("continue on error", "yes" if report["continue_on_error"] else "no"),
        ("chunks", f"{report['chunks_done']}/{report['total_chunks']}"),
        ("total processed", str(report["total_processed"])),
        ("successful", str(report["successful"])),
        ("failed", str(report["failed"])),
        ("skipped (already done)", str(report["skipped"])),
        ("tokens " + ("that would be granted" if report["dry_run"] else "granted"),
         f"{report['tokens_granted']:+d}"),
    ]
    if report.get("alert"):
        rows.append(("alert", "[red]failure rate above the threshold[/red]"))
    if report.get("message"):
        rows.append(("note", report["message"]))
    for row in rows:
        table.add_row(*row)
    console().print(table)
    if report["errors"]:
        errors = Table(title=f"errors ({len(report['errors'])} shown)")
        for col in ("user", "error"):
            errors.add_column(col)
        for e in report["errors"][:20]:
            errors.add_row(str(e.get("user_id") or f"chunk {e.get('chunk')}"), e["error"])
        console().print(errors)
    if report.get("changes"):
        changes = Table(title=f"changes that would be made ({len(report['changes'])} shown)")
        for col in ("user", "plan", "period", "before", "after", "amount"):
            changes.add_column(col)
        for c in report["changes"][:20]:
            changes.add_row(c["user_id"], c["plan"], c["period"], str(c["balance_before"]),
                            str(c["balance_after"]), f"{c['amount']:+d}")
        console().print(changes)


@renew_app.command("runs")
def renew_runs(kind: Annotated[str | None, typer.Option(help="daily or monthly")] = None,
               limit: Annotated[int, typer.Option(min=1, max=1000)] = 20,
               json_: JsonOpt = False) -> None:
    """Recent runs, newest first."""
    from tokenledger.db.uow import unit_of_work
    from tokenledger.renewals.service import list_runs

    with unit_of_work(settings()) as uow:
        runs = list_runs(uow.session, kind, limit)
    if json_:
        print_json(runs)
        return
    from rich.table import Table

    table = Table(title=f"{len(runs)} renewal run(s)")
    for col in ("id", "kind", "trigger", "status", "as of", "processed", "ok", "failed",
                "skipped", "tokens", "dry"):
        table.add_column(col)
    for r in runs:
        table.add_row(str(r["id"]), r["kind"], r["trigger"], r["status"], r["as_of"][:19],
                      str(r["total_processed"]), str(r["successful"]), str(r["failed"]),
                      str(r["skipped"]), str(r["tokens_granted"]), "yes" if r["dry_run"] else "")
    console().print(table)


@renew_app.command("show")
def renew_show(run_id: Annotated[int, typer.Argument(help="The run's id.")],
               json_: JsonOpt = False) -> None:
    """One run: totals, errors, and for dry runs the changes it would make."""
    from tokenledger.db.uow import unit_of_work
    from tokenledger.renewals.service import run_report

    with unit_of_work(settings()) as uow:
        report = run_report(uow.session, run_id)
    _show_report(report, json_)


@renew_app.command("expire")
def renew_expire(json_: JsonOpt = False) -> None:
    """Zero every wallet past its expiry now (beat does this every 5 minutes)."""
    from tokenledger.renewals.runs import expire_batch

    totals = {"wallets": 0, "tokens": 0, "accounts": 0}
    while True:
        result = expire_batch(settings())
        totals["wallets"] += result.wallets
        totals["tokens"] += result.tokens
        totals["accounts"] += result.accounts
        if not result.more:
            break
    if json_:
        print_json(totals)
    else:
        console().print(f"expired {totals['wallets']} wallet(s) on {totals['accounts']} "
                      f"account(s): {totals['tokens']} tokens")
