"""``accounts``: open accounts, ask when they renew, set their low-balance threshold,
erase them."""

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


@accounts_app.command("erase")
def accounts_erase(
    user_id: UserArg,
    by: Annotated[str | None, typer.Option(
        "--by", help="Who erases, for the erasure log (default: cli:<login name>).")] = None,
    json_: JsonOpt = False,
) -> None:
    """Erase a person: their user id becomes a pseudonym everywhere, free-text metadata
    goes, every amount stays (needs TOKENLEDGER_ERASURE_SECRET). Safe to run twice."""
    from tokenledger.sdk.client import LedgerClient

    with LedgerClient(settings()) as client:
        erased = client.erase_account(user_id, erased_by=by or f"cli:{_login()}")
    if json_:
        print_json(erased.as_dict())
        return
    again = " (already erased)" if erased.already_erased else ""
    console().print(f"erased{again}: now {erased.pseudonym}, by {erased.erased_by} at "
                    f"{erased.erased_at.isoformat()}; {sum(erased.rows.values())} row(s) "
                    "rewritten", highlight=False)


def _login() -> str:
    import getpass

    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no login name (a container): still log the tool
        return "unknown"


@accounts_app.command("threshold")
def accounts_threshold(
    user_id: UserArg,
    threshold: Annotated[int | None, typer.Argument(
        min=0, help="Alert (balance_low) at or below this balance.")] = None,
    clear: Annotated[bool, typer.Option("--clear", help="Use the plan's threshold again.")]
    = False,
) -> None:
    """Set the account's own low-balance threshold, overriding its plan's."""
    from tokenledger.cli.base import fail
    from tokenledger.sdk.client import LedgerClient

    if (threshold is None) == (not clear):
        fail("threshold: give a number, or --clear")
    with LedgerClient(settings()) as client:
        client.set_low_balance_threshold(user_id, None if clear else threshold)
    console().print(f"{user_id}: low-balance threshold "
                    + ("from the plan" if clear else str(threshold)), highlight=False)
