"""Reading the ledger: ``balance``, ``history`` and ``verify``."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import typer

from tokenledger.cli.base import JsonOpt, app, console, print_json, settings


@app.command()
def balance(user_id: Annotated[str, typer.Argument(help="The account's user id.")],
            at: Annotated[str | None, typer.Option(
                help="As of this moment (ISO 8601; UTC unless it says otherwise): every "
                     "entry dated before it, and the holds open then.")] = None,
            json_: JsonOpt = False) -> None:
    """An account's balance and its wallets, now or as of a moment."""
    from tokenledger.sdk.client import LedgerClient

    with LedgerClient(settings()) as client:
        b = client.balance(user_id, at=_moment(at) if at is not None else None)
    if json_:
        data = {"user_id": b.user_id, "plan": b.plan, "balance": b.balance,
                "wallets": [w.__dict__ for w in b.wallets]}
        if b.at is not None:
            data.update(at=b.at.isoformat(), held=b.held)
        print_json(data)
        return
    from rich.table import Table

    when = f" as of {b.at.isoformat()}" if b.at else ""
    held = f" ({b.held} held)" if b.held else ""
    table = Table(title=f"{b.user_id} ({b.plan}): {b.balance} tokens{when}{held}")
    for col in ("wallet", "type", "balance", "held", "expires", "live"):
        table.add_column(col)
    for w in b.wallets:
        table.add_row(str(w.id), w.wallet_type, str(w.balance), str(w.held),
                      w.expires_at.isoformat() if w.expires_at else "-",
                      "yes" if w.is_active else "no")
    console().print(table)


def _moment(value: str) -> datetime:
    from tokenledger.errors import ValidationFailed

    try:
        return datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValidationFailed(f"at: {value!r} is not an ISO 8601 time "
                               "(2026-11-30T23:59:59Z, or a date)") from None


@app.command()
def history(
    user_id: Annotated[str, typer.Argument(help="The account's user id.")],
    limit: Annotated[int, typer.Option(min=1, max=1000, help="At most this many entries.")]
    = 20,
    offset: Annotated[int, typer.Option(min=0, help="Skip this many (newest first).")] = 0,
    type_: Annotated[str | None, typer.Option("--type", help="Only this entry type.")] = None,
    feature: Annotated[str | None, typer.Option(help="Only this feature.")] = None,
    json_: JsonOpt = False,
) -> None:
    """An account's ledger entries, newest first."""
    from tokenledger.db.uow import unit_of_work
    from tokenledger.ledger.reports import history as query

    with unit_of_work(settings()) as uow:
        rows = query(uow.session, user_id, limit=limit, offset=offset, type_=type_,
                     feature=feature)
    if json_:
        print_json(rows)
        return
    from rich.table import Table

    table = Table(title=f"history of {user_id}")
    for col in ("id", "when", "type", "feature", "wallet", "amount", "after", "key"):
        table.add_column(col)
    for r in rows:
        table.add_row(str(r["id"]), r["created_at"][:19], r["type"], r["feature"] or "",
                      r["wallet_type"], f"{r['amount']:+d}", str(r["balance_after"]),
                      r["event_key"] or "")
    console().print(table)


@app.command()
def verify(json_: JsonOpt = False) -> None:
    """Check every wallet against its entries and every key applied once; exit 1 if not."""
    from tokenledger.db.uow import unit_of_work
    from tokenledger.ledger.verify import verify as check

    with unit_of_work(settings()) as uow:
        report = check(uow.session)
    if json_:
        print_json(report.as_dict())
    else:
        mark = "[green]OK[/green]" if report.ok else "[red]MISMATCH[/red]"
        console().print(f"verify {mark}: {report.wallets} wallets, {report.entries} entries, "
                        f"{report.outcomes} outcomes; {len(report.balance_mismatches)} balance "
                        f"mismatches, {len(report.chain_breaks)} chain breaks, "
                        f"{len(report.applied_twice)} keys applied twice, "
                        f"{len(report.entries_without_outcome)} entries without an outcome, "
                        f"{report.carry_forwards} carry-forwards "
                        f"({len(report.carry_forward_breaks)} not matching the archive)")
        for problem in (report.balance_mismatches + report.chain_breaks + report.applied_twice
                        + report.entries_without_outcome + report.carry_forward_breaks)[:20]:
            console().print(f"  {problem}", highlight=False)
    if not report.ok:
        raise typer.Exit(1)
