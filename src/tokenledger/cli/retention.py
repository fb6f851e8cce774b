"""``retention``: fold old entries into carry-forwards, archive them, prune old outcomes."""

from __future__ import annotations

from typing import Annotated

import typer

from tokenledger.cli.base import JsonOpt, app, console, print_json, settings

retention_app = typer.Typer(no_args_is_help=True,
                            help="Data retention: compact the ledger's old entries.")
app.add_typer(retention_app, name="retention")


@retention_app.command("compact")
def retention_compact(
    older_than: Annotated[str, typer.Option(
        help="Fold entries older than this (400d, 12h, ...; at least 1 day).")],
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Count what would be folded; change nothing.")] = False,
    chunk_size: Annotated[int | None, typer.Option(
        min=1, max=5_000, help="Accounts per transaction (default "
                                 "TOKENLEDGER_RETENTION_CHUNK_SIZE).")] = None,
    json_: JsonOpt = False,
) -> None:
    """Fold each wallet's old entries into one CARRY_FORWARD entry (verify still passes),
    archive them, and prune idempotency outcomes past their grace. Online; safe twice."""
    from tokenledger.errors import ValidationFailed
    from tokenledger.retention.compaction import compact
    from tokenledger.timeutil import parse_age

    try:
        age = parse_age(older_than)
    except ValueError as exc:
        raise ValidationFailed(f"older_than: {exc}") from None
    s = settings()
    out = console()
    if json_:
        report = compact(s, age, dry_run=dry_run, chunk_size=chunk_size)
        print_json(report.as_dict())
        return
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=out, transient=True) as progress:
        task = progress.add_task("compacting", total=None)
        report = compact(s, age, dry_run=dry_run, chunk_size=chunk_size, on_chunk=lambda r:
                         progress.update(task, description=(
                             f"{r.accounts} accounts, {r.entries_archived} entries "
                             f"{'to fold' if dry_run else 'folded'}")))
    verb = "would fold" if dry_run else "folded"
    out.print(f"{'dry run ' if dry_run else 'run '}{report.run_id}: {verb} "
              f"{report.entries_archived} entries of {report.wallets} wallets "
              f"({report.accounts} accounts) into {report.carry_forwards} carry-forwards, "
              f"cut-off {report.cutoff.isoformat()}", highlight=False)
    out.print(f"outcomes stored before {report.key_cutoff.isoformat()}: "
              f"{report.outcomes_archived} {'to archive' if dry_run else 'archived'}; "
              f"webhook deliveries deleted: {report.deliveries_deleted}; "
              f"{report.seconds:.1f} s", highlight=False)
