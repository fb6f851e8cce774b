"""``dashboard-link``: mint a user's read-only dashboard link."""

from __future__ import annotations

from typing import Annotated

import typer

from tokenledger.cli.base import JsonOpt, app, console, print_json, settings


@app.command("dashboard-link")
def dashboard_link(
    user_id: Annotated[str, typer.Argument(help="The account's user id.")],
    ttl: Annotated[int, typer.Option("--ttl", min=1, max=7 * 86400,
                                     help="Seconds the link works (default 15 minutes).")]
    = 900,
    base_url: Annotated[str | None, typer.Option(
        help="The API's public URL (default: TOKENLEDGER_DASHBOARD_URL).")] = None,
    json_: JsonOpt = False,
) -> None:
    """Print a signed link to USER's read-only dashboard, and the badge snippet."""
    from tokenledger.sdk.client import LedgerClient

    with LedgerClient(settings()) as client:
        link = client.dashboard_link(user_id, ttl, base_url)
    if json_:
        print_json(link.as_dict())
        return
    out = console()
    out.print(link.url, highlight=False, soft_wrap=True, markup=False)
    out.print(f"expires {link.expires_at.isoformat()}; the balance badge for your pages:",
              highlight=False)
    out.print(link.badge_html, highlight=False, soft_wrap=True, markup=False)
