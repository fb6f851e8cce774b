"""``accounts``: open, list and show accounts, change their plan, close them, ask when
they renew, set their low-balance threshold, erase them."""

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
    from tokenledger.errors import AccountNotFound
    from tokenledger.sdk.client import LedgerClient

    with LedgerClient(settings()) as client:
        try:
            client.balance(user_id)
            was_open = True
        except AccountNotFound:
            was_open = False
        client.open_account(user_id, plan=plan, timezone=timezone)
        now = client.balance(user_id)
    done = f"already open on plan {now.plan}" if was_open else f"opened on plan {now.plan}"
    console().print(f"{user_id}: {done}, balance {now.balance}", highlight=False)


@accounts_app.command("list")
def accounts_list(
    plan: Annotated[str | None, typer.Option(help="Only accounts on this plan.")] = None,
    after: Annotated[str | None, typer.Option(help="Start after this user id (paging).")]
    = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="At most this many.")] = 50,
    json_: JsonOpt = False,
) -> None:
    """Accounts in user id order."""
    from tokenledger.db.uow import unit_of_work
    from tokenledger.ledger.reports import list_accounts

    with unit_of_work(settings()) as uow:
        rows = list_accounts(uow.session, plan=plan, after=after, limit=limit)
    if json_:
        print_json(rows)
        return
    from rich.table import Table

    table = Table(title=f"{len(rows)} account(s)")
    for col in ("user", "plan", "timezone", "created", "closed"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["user_id"], r["plan"], r["timezone"], (r["created_at"] or "-")[:19],
                      (r["closed_at"] or "-")[:19])
    console().print(table)


@accounts_app.command("show")
def accounts_show(user_id: UserArg, json_: JsonOpt = False) -> None:
    """One account: its plan, timezone, dates, balance and open holds."""
    from tokenledger.db.uow import unit_of_work
    from tokenledger.ledger.reports import account_row, balance, get_account
    from tokenledger.tokenprocess.service import open_holds

    with unit_of_work(settings()) as uow:
        shown = account_row(get_account(uow.session, user_id))
        shown["balance"] = balance(uow.session, user_id, uow.now).balance
        shown["open_holds"] = [h["id"] for h in open_holds(uow.session, user_id)]
    if json_:
        print_json(shown)
        return
    for name, value in shown.items():
        console().print(f"{name}: {value if value not in (None, []) else '-'}",
                        highlight=False)


@accounts_app.command("change-plan")
def accounts_change_plan(
    user_id: UserArg,
    plan: Annotated[str, typer.Argument(help="The new plan's code (catalog show lists them).")],
) -> None:
    """Move the account to another plan; no credits move, the new plan applies from its
    next reset or renewal."""
    from tokenledger.sdk.client import LedgerClient

    with LedgerClient(settings()) as client:
        change = client.change_plan(user_id, plan)
    console().print(f"{user_id}: plan {change.previous} -> {change.plan}" if change.changed
                    else f"{user_id}: already on plan {change.plan}", highlight=False)


@accounts_app.command("close")
def accounts_close(user_id: UserArg) -> None:
    """Close the account: charges and starts are refused from now on; every row stays."""
    from tokenledger.sdk.client import LedgerClient

    with LedgerClient(settings()) as client:
        closed_at = client.close_account(user_id)
    console().print(f"{user_id}: closed at {closed_at.isoformat()}", highlight=False)


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
