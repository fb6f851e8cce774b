"""``start`` and ``end``: a token process from the command line (check access and balance
and place a hold; then report the usage, which settles it)."""

from __future__ import annotations

from typing import Annotated

import typer

from tokenledger.cli.base import ExitCode, JsonOpt, app, console, print_json, settings
from tokenledger.cli.publish import KeyOpt, WaitOpt, fields, publish_and_report


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
    """Start a token process: check access and balance and place a hold (exit 11 if
    refused, 10 when the key's first start answers)."""
    from tokenledger.sdk.client import LedgerClient

    with LedgerClient(settings()) as client:
        result = client.token_process_start(user_id, feature, max_output_tokens=max_output_tokens,
                                            hold=hold, model=model, key=key)
    if json_:
        print_json(result.as_dict())
    elif result.accessible:
        again = " (replay: this key's first start)" if result.replay else ""
        console().print(f"[green]accessible[/green]{again}: hold #{result.hold_id} holds "
                        f"{result.held} token(s) until {result.expires_at:%Y-%m-%d %H:%M:%S} "
                        f"UTC; {result.token} token(s) available (end it: tokenledger end "
                        f"{user_id} {feature} --hold-id {result.hold_id} ...)", highlight=False,
                        soft_wrap=True)
    else:
        console().print(f"[red]not-accessible[/red]: {result.message}; {result.token} token(s) "
                        "available" + (f", {result.required} required"
                                       if result.required is not None else ""),
                        highlight=False, soft_wrap=True)
    if not result.accessible:
        raise typer.Exit(ExitCode.DECLINED)
    if result.replay:
        raise typer.Exit(ExitCode.REPLAY)


@app.command()
def end(
    user_id: Annotated[str, typer.Argument(help="The account's user id.")],
    feature: Annotated[str, typer.Argument(help="The feature the process ran.")],
    input_tokens: Annotated[int, typer.Option(min=0, help="Input tokens used.")],
    output_tokens: Annotated[int, typer.Option(min=0, help="Output tokens used.")],
    hold_id: Annotated[int | None, typer.Option(
        min=1, help="The start's hold id (default: the account's one open hold for the "
                    "feature).")] = None,
    model: Annotated[str | None, typer.Option(help="The model to price with.")] = None,
    key: KeyOpt = None,
    wait: WaitOpt = 10.0,
    json_: JsonOpt = False,
) -> None:
    """End a token process: the worker prices the usage and settles the hold (the same
    exit codes as publish)."""
    publish_and_report(fields(type="token_process_end", user_id=user_id,
                              feature_endpoint_id=feature, input_tokens=input_tokens,
                              output_tokens=output_tokens, model=model, hold_id=hold_id,
                              key=key), wait, json_)


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
    """Grow an open hold under the account lock (exit 11 if the limit is reached, 12 if the
    hold is closed)."""
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
        raise typer.Exit(ExitCode.DECLINED if result.status == "limit_reached"
                         else ExitCode.REJECTED)
