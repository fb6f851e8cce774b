"""``webhooks``: endpoints (add, list, remove) and their deliveries (list, redeliver)."""

from __future__ import annotations

from typing import Annotated

import typer

from tokenledger.cli.base import JsonOpt, app, console, print_json, settings

webhooks_app = typer.Typer(no_args_is_help=True,
                           help="Webhook endpoints and the deliveries sent to them.")
app.add_typer(webhooks_app, name="webhooks")


@webhooks_app.command("add")
def webhooks_add(
    url: Annotated[str, typer.Argument(help="Where to POST (http:// or https://).")],
    event: Annotated[list[str], typer.Option(
        "--event", "-e", help="An event type to receive (repeat for more): balance_low, "
                              "balance_recovered, balance_changed, hold_expired, "
                              "renewal_run_finished, renewal_failure_alert, "
                              "dead_letter_added.")],
    description: Annotated[str | None, typer.Option(help="A note for people.")] = None,
    json_: JsonOpt = False,
) -> None:
    """Register an endpoint; prints its signing secret (Standard Webhooks, whsec_...)."""
    from tokenledger.db.uow import unit_of_work
    from tokenledger.webhooks.service import add_endpoint

    with unit_of_work(settings()) as uow:
        endpoint = add_endpoint(uow.session, url, event, description, uow.now)
    if json_:
        print_json(endpoint)
        return
    out = console()
    out.print(f"endpoint {endpoint['id']}: {endpoint['url']} "
              f"({', '.join(endpoint['event_types'])})", highlight=False)
    out.print(f"signing secret: {endpoint['secret']}", highlight=False)


@webhooks_app.command("list")
def webhooks_list(
    all_: Annotated[bool, typer.Option("--all", help="Removed endpoints too.")] = False,
    secrets: Annotated[bool, typer.Option("--secrets", help="Show signing secrets.")] = False,
    json_: JsonOpt = False,
) -> None:
    """Registered endpoints (the implicit one of TOKENLEDGER_ALERT_WEBHOOK_URL included)."""
    from tokenledger.db.uow import unit_of_work
    from tokenledger.webhooks.service import list_endpoints

    with unit_of_work(settings()) as uow:
        rows = list_endpoints(uow.session, include_removed=all_, secrets_=secrets)
    if json_:
        print_json(rows)
        return
    from rich.table import Table

    table = Table(title=f"{len(rows)} webhook endpoint(s)")
    for col in ("id", "url", "events", "active", "note", *(("secret",) if secrets else ())):
        table.add_column(col)
    for r in rows:
        note = "TOKENLEDGER_ALERT_WEBHOOK_URL" if r["implicit"] else (r["description"] or "")
        table.add_row(str(r["id"]), r["url"], ", ".join(r["event_types"]),
                      "yes" if r["active"] else "no", note,
                      *((r["secret"],) if secrets else ()))
    console().print(table)


@webhooks_app.command("remove")
def webhooks_remove(endpoint_id: Annotated[int, typer.Argument(help="The endpoint's id.")]
                    ) -> None:
    """Stop delivering to an endpoint; its pending deliveries are cancelled."""
    from tokenledger.db.uow import unit_of_work
    from tokenledger.webhooks.service import remove_endpoint

    with unit_of_work(settings()) as uow:
        cancelled = remove_endpoint(uow.session, endpoint_id, uow.now)
    console().print(f"endpoint {endpoint_id} removed; {cancelled} pending delivery(ies) "
                    "cancelled", highlight=False)


@webhooks_app.command("deliveries")
def webhooks_deliveries(
    status: Annotated[str | None, typer.Option(
        help="pending, delivered, failed or cancelled.")] = None,
    endpoint: Annotated[int | None, typer.Option(help="Only this endpoint's.")] = None,
    event: Annotated[str | None, typer.Option("--event", help="Only this event type.")]
    = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="At most this many.")] = 50,
    json_: JsonOpt = False,
) -> None:
    """Deliveries, newest first: status, attempts, the last answer, the next attempt."""
    from tokenledger.db.uow import unit_of_work
    from tokenledger.webhooks.service import list_deliveries

    with unit_of_work(settings()) as uow:
        rows = list_deliveries(uow.session, status=status, endpoint_id=endpoint,
                               event_type=event, limit=limit)
    if json_:
        print_json(rows)
        return
    from rich.table import Table

    table = Table(title=f"{len(rows)} webhook delivery(ies)")
    for col in ("id", "endpoint", "event", "status", "attempts", "last", "next attempt",
                "webhook id"):
        table.add_column(col)
    for r in rows:
        last = (str(r["last_status"]) if r["last_status"] is not None
                else (r["last_error"] or "-")[:40])
        table.add_row(str(r["id"]), str(r["endpoint_id"]), r["event_type"], r["status"],
                      str(r["attempts"]), last, (r["next_attempt_at"] or "-")[:19],
                      r["webhook_id"])
    console().print(table)


@webhooks_app.command("redeliver")
def webhooks_redeliver(delivery_id: Annotated[int, typer.Argument(
        help="The delivery's id (see `webhooks deliveries`).")]) -> None:
    """Send a delivery again (same webhook id, fresh retry schedule), now."""
    from tokenledger.db.uow import unit_of_work
    from tokenledger.webhooks.service import redeliver

    with unit_of_work(settings()) as uow:
        delivery = redeliver(uow, delivery_id)
    console().print(f"delivery {delivery_id} ({delivery['event_type']}, "
                    f"{delivery['webhook_id']}) queued again", highlight=False)
