"""``accounts``: open accounts and ask when they renew."""

from __future__ import annotations

from typing import Annotated

import typer

from tokenledger.cli.base import JsonOpt, app, console, print_json, settings

accounts_app = typer.Typer(no_args_is_help=True, help="Open and inspect accounts.")
app.add_typer(accounts_app, name="accounts")

UserArg = Annotated[str, typer.Argument(help="The account's user id.")]


@accounts_app.command("open")
def accounts_open(
    user_id: UserArg,
    plan: Annotated[str | None, typer.Option(help="Plan code (default: the catalog's).")] = None,
    timezone: Annotated[str | None, typer.Option(help="IANA timezone (default: "
                                                      "TOKENLEDGER_TIMEZONE).")] = None,
) -> None:
    """Open an account now and grant the plan's opening tokens."""
    from tokenledger.sdk.client import LedgerClient

    with LedgerClient(settings()) as client:
        key = client.open_account(user_id, plan=plan, timezone=timezone)
        result = client.result(key)
        balance = client.balance(user_id).balance
    console().print(f"{user_id}: {result.status}"
                    + (f" ({result.reason})" if result.reason else "")
                    + f", balance {balance}", highlight=False)


@accounts_app.command("eligibility")
def accounts_eligibility(user_id: UserArg, json_: JsonOpt = False) -> None:
    """Is the account due for its daily reset or monthly renewal, and when is the next?"""
    from tokenledger.db.uow import unit_of_work
    from tokenledger.renewals.service import eligibility

    with unit_of_work(settings()) as uow:
        e = eligibility(uow.session, user_id, uow.catalog, uow.now)
    if json_:
        print_json(e.as_dict())
        return
    mark = "[green]eligible[/green]" if e.eligible else "[yellow]not eligible[/yellow]"
    out = console()
    out.print(f"{user_id} ({e.plan}, {e.period}, {e.renewal_mode} {e.allocation}): {mark}")
    out.print(f"  reason: {e.reason}", highlight=False)
    out.print(f"  next renewal: {e.next_renewal_date.isoformat()} "
              f"(in {e.days_until_renewal} day(s))", highlight=False)
    out.print(f"  last renewal: {e.last_renewal or 'never'}; STANDARD balance: "
              f"{e.standard_balance if e.standard_balance is not None else '-'}",
              highlight=False)
