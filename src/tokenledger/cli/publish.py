"""``publish``: send an event to the workers and wait for its outcome."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from tokenledger.cli.base import (
    ExitCode,
    JsonOpt,
    app,
    console,
    fail,
    outcome_exit,
    print_json,
    settings,
)
from tokenledger.errors import ResultTimeout

if TYPE_CHECKING:
    from tokenledger.config import Settings
    from tokenledger.results import EventResult
    from tokenledger.sdk.client import LedgerClient

publish_app = typer.Typer(no_args_is_help=True, help="Publish an event to the workers.")
app.add_typer(publish_app, name="publish")

UserArg = Annotated[str, typer.Argument(help="The account's user id.")]
KeyOpt = Annotated[str | None, typer.Option(help="Idempotency key (default: a new UUID).")]
WaitOpt = Annotated[float, typer.Option(help="Seconds to wait for the outcome (0: don't).")]


def publish_and_report(event: dict[str, Any], wait: float, json_: bool = False) -> None:
    """Publish ``event``, print what happened to it and exit with its outcome's code
    (``ExitCode``: 0 applied, 10 replay, 11 declined, ...)."""
    from tokenledger.sdk.client import LedgerClient

    with LedgerClient(settings()) as client:
        key = client.publish(event)
        if not json_:
            console().print(f"published {event['type']} [bold]{key}[/bold]{_via(client)}",
                            highlight=False)
        if wait <= 0:
            if json_:
                print_json({"key": key, "status": "published"})
            return
        try:
            result = client.result(key, timeout=wait)
        except ResultTimeout:
            _no_outcome(client.settings, key, wait, json_)
    if json_:
        print_json(result.as_dict())
    else:
        console().print(describe_outcome(result), highlight=False, soft_wrap=True)
    raise typer.Exit(outcome_exit(result))


def describe_outcome(result: EventResult) -> str:
    """One line: the status (``replay`` marked), the reason, the data."""
    status = "applied (replay: the key was applied before)" if result.replay else result.status
    line = status + (f": {result.reason}" if result.reason else "")
    if result.stored is not None:
        line += f"; the key's stored outcome: {result.stored.status}"
    return line + (f" {result.data}" if result.data else "")


def _via(client: LedgerClient) -> str:
    """Which broker carried the event, when the user did not name one (so setting only
    the database URL never hides where events went)."""
    s = client.settings
    return "" if s.broker_url is not None else f" via the embedded Redis in {s.home}"


def _no_outcome(s: Settings, key: str, wait: float, json_: bool) -> NoReturn:
    """Exit 15, saying whether any worker consumes the queue (and naming it)."""
    from tokenledger.queue import workers

    consumers = workers.ask(s, timeout=1.0).consuming(s.queue)
    why = (f"{len(consumers)} worker(s) consume queue {s.queue!r}; the event is still queued"
           if consumers else
           f"no worker consumes queue {s.queue!r} (start one: tokenledger worker); the "
           "event waits there")
    if json_:
        print_json({"key": key, "status": "timed_out", "reason": why})
    fail(f"no outcome for key {key!r} after {wait:g}s: {why}", ExitCode.TIMED_OUT)


def fields(**values: Any) -> dict[str, Any]:
    """An event dict from options, leaving out the ones not given."""
    return {k: v for k, v in values.items() if v is not None}


@publish_app.command("charge")
def publish_charge(
    user_id: UserArg,
    feature: Annotated[str | None, typer.Option(help="Charge this feature's catalog cost.")]
    = None,
    amount: Annotated[int | None, typer.Option(help="Charge exactly this many credits.")]
    = None,
    key: KeyOpt = None,
    allow_overdraft: Annotated[bool, typer.Option(
        "--allow-overdraft", help="Let the STANDARD wallet go negative.")] = False,
    preferred_wallet_type: Annotated[str | None, typer.Option(
        help="Draw from wallets of this type first.")] = None,
    wait: WaitOpt = 10.0,
    json_: JsonOpt = False,
) -> None:
    """Charge by feature or amount."""
    publish_and_report(fields(type="charge", user_id=user_id, feature=feature, amount=amount,
                              key=key, allow_overdraft=allow_overdraft or None,
                              preferred_wallet_type=preferred_wallet_type), wait, json_)


@publish_app.command("credit")
def publish_credit(
    user_id: UserArg,
    amount: Annotated[int, typer.Argument(help="Credits to add.")],
    wallet_type: Annotated[str, typer.Option(help="Wallet type to credit.")] = "PREMIUM",
    expires_at: Annotated[datetime | None, typer.Option(help="The wallet's expiry (UTC).")]
    = None,
    reason: Annotated[str | None, typer.Option(help="Why (purchase, bonus, ...).")] = None,
    key: KeyOpt = None,
    wait: WaitOpt = 10.0,
    json_: JsonOpt = False,
) -> None:
    """Add credits to a wallet."""
    publish_and_report(fields(type="credit", user_id=user_id, amount=amount,
                              wallet_type=wallet_type, reason=reason, key=key,
                              expires_at=expires_at.isoformat() if expires_at else None),
                       wait, json_)


@publish_app.command("refund")
def publish_refund(
    user_id: UserArg,
    original_key: Annotated[str, typer.Argument(help="The key of the charge to refund.")],
    amount: Annotated[int | None, typer.Option(help="Refund this much (default: all).")]
    = None,
    reason: Annotated[str | None, typer.Option(help="operation_failed, timeout, goodwill, ...")]
    = None,
    key: KeyOpt = None,
    wait: WaitOpt = 10.0,
    json_: JsonOpt = False,
) -> None:
    """Refund (part of) an earlier charge."""
    publish_and_report(fields(type="refund", user_id=user_id, original_key=original_key,
                              amount=amount, reason=reason, key=key), wait, json_)


@publish_app.command("end")
def publish_end(
    user_id: UserArg,
    feature: Annotated[str, typer.Argument(help="The feature the process ran.")],
    input_tokens: Annotated[int, typer.Option(min=0, help="Input tokens used.")],
    output_tokens: Annotated[int, typer.Option(min=0, help="Output tokens used.")],
    model: Annotated[str | None, typer.Option(help="The model to price with.")] = None,
    hold_id: Annotated[int | None, typer.Option(
        min=1, help="The start's hold id (default: the account's one open hold for the "
                    "feature).")] = None,
    key: KeyOpt = None,
    wait: WaitOpt = 10.0,
    json_: JsonOpt = False,
) -> None:
    """End a token process: the worker prices the usage and settles the hold."""
    publish_and_report(fields(type="token_process_end", user_id=user_id,
                              feature_endpoint_id=feature, input_tokens=input_tokens,
                              output_tokens=output_tokens, model=model, hold_id=hold_id,
                              key=key), wait, json_)
