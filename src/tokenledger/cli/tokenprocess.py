"""``start``: a token-process start (check access and balance, place a hold)."""

from __future__ import annotations

from typing import Annotated

import typer

from tokenledger.cli.base import JsonOpt, app, console, print_json, settings


@app.command()
def start(
    user_id: Annotated[str, typer.Argument(help="The account's user id.")],
    feature: Annotated[str, typer.Argument(help="The feature to start.")],
    max_output_tokens: Annotated[int | None, typer.Option(
        min=0, help="Price the hold from this many output tokens.")] = None,
    hold: Annotated[int | None, typer.Option(min=0, help="Hold exactly this many.")] = None,
    model: Annotated[str | None, typer.Option(help="Model to price with.")] = None,
    key: Annotated[str | None, typer.Option(help="Idempotency key for the start.")] = None,
    json_: JsonOpt = False,
) -> None:
    """Start a token process: check access and balance and place a hold (exit 1 if refused)."""
    from tokenledger.sdk.client import LedgerClient

    with LedgerClient(settings()) as client:
        result = client.token_process_start(user_id, feature, max_output_tokens=max_output_tokens,
                                            hold=hold, model=model, key=key)
    if json_:
        print_json(result.as_dict())
    elif result.accessible:
        console().print(f"[green]accessible[/green]: hold {result.hold_id} of {result.held} "
                        f"token(s) until {result.expires_at:%Y-%m-%d %H:%M:%S} UTC; "
                        f"{result.token} available", highlight=False)
    else:
        console().print(f"[red]not-accessible[/red]: {result.message}; {result.token} available"
                        + (f", {result.required} required" if result.required is not None
                           else ""), highlight=False)
    if not result.accessible:
        raise typer.Exit(1)


@app.command()
def extend(
    hold_id: Annotated[int, typer.Argument(help="The open hold to grow.")],
    by: Annotated[int | None, typer.Option(min=0, help="Hold this many more.")] = None,
    to_output_tokens: Annotated[int | None, typer.Option(
        min=0, help="Hold enough for this many output tokens in all.")] = None,
    input_tokens: Annotated[int, typer.Option(
        min=0, help="Input tokens to price --to-output-tokens after.")] = 0,
    key: Annotated[str | None, typer.Option(help="Idempotency key for the extend.")] = None,
    json_: JsonOpt = False,
) -> None:
    """Grow an open hold under the account lock (exit 1 if the limit is reached or the hold
    is closed)."""
    from tokenledger.sdk.client import LedgerClient

    with LedgerClient(settings()) as client:
        result = client.extend(hold_id, by, to_output_tokens=to_output_tokens,
                               input_tokens=input_tokens, key=key)
    if json_:
        print_json(result.as_dict())
    elif result.extended:
        console().print(f"[green]extended[/green]: hold {hold_id} now {result.held} token(s) "
                        f"(+{result.added}); {result.available} available", highlight=False)
    else:
        console().print(f"[red]{result.status}[/red]: {result.reason}; hold {hold_id} "
                        f"is {result.held}, {result.available} available", highlight=False)
    if not result.extended:
        raise typer.Exit(1)
