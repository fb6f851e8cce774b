"""The command line's application and the helpers every command module uses."""

from __future__ import annotations

import json
import sys
from enum import IntEnum
from functools import cache
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from typer.core import TyperGroup
from typer.exceptions import Abort, Exit, TyperException

if TYPE_CHECKING:
    from rich.console import Console

    from tokenledger.config import Settings
    from tokenledger.results import EventResult


class ExitCode(IntEnum):
    """The exit codes of every command, so a script can tell outcomes apart without
    reading text; ``publish``, ``start`` and ``end`` use all of them (README's table)."""

    APPLIED = 0
    UNEXPECTED = 1  # also: a service unreachable, a setting wrong, the schema missing
    USAGE = 2  # a bad argument, or something named that does not exist
    REPLAY = 10
    DECLINED = 11  # too few tokens, or the feature is not in the plan
    REJECTED = 12
    CONFLICT = 13
    DEAD_LETTERED = 14
    TIMED_OUT = 15  # no outcome within --wait


_OUTCOME_EXITS = {"declined": ExitCode.DECLINED, "rejected": ExitCode.REJECTED,
                  "conflict": ExitCode.CONFLICT, "dead_lettered": ExitCode.DEAD_LETTERED}


def outcome_exit(result: EventResult) -> ExitCode:
    """The exit code that tells what happened to the caller's own publish."""
    if result.status == "applied":
        return ExitCode.REPLAY if result.replay else ExitCode.APPLIED
    return _OUTCOME_EXITS.get(result.status, ExitCode.UNEXPECTED)


def error_exit(exc: BaseException) -> ExitCode:
    """The exit code of a failure: the caller's input (2) apart from the environment (1)."""
    from tokenledger import errors

    for kind, code in ((errors.Conflict | errors.AccountExists, ExitCode.CONFLICT),
                       (errors.ResultTimeout, ExitCode.TIMED_OUT),
                       (errors.FeatureNotAccessible | errors.InsufficientTokens, ExitCode.DECLINED),
                       (errors.ServiceUnavailable | errors.ConfigurationError
                        | errors.NotMigrated | errors.RetryableConflict, ExitCode.UNEXPECTED)):
        if isinstance(exc, kind):
            return code
    # Raised on purpose: a refusal of what the caller asked; anything else is unexpected.
    return ExitCode.USAGE if isinstance(exc, errors.TokenLedgerError) else ExitCode.UNEXPECTED


class _OneLineErrors(TyperGroup):
    """Every failure of a command ends as one line on stderr with the exit code of its
    kind (``error_exit``), never a traceback (``tokenledger`` and typer's CliRunner
    alike)."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (Exit, Abort, TyperException):  # an exit code, a usage error: typer's
            raise
        except Exception as exc:  # noqa: BLE001 - no traceback reaches a user
            from tokenledger.errors import as_ledger_error

            error = as_ledger_error(exc)
            err_console().print(f"[red]error:[/red] {error}", highlight=False, soft_wrap=True)
            raise typer.Exit(error_exit(exc)) from None


app = typer.Typer(cls=_OneLineErrors, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None,  # plain help: rich's formatter alone doubles --help
                  add_completion=False,
                  help="tokenledger: token (credit) accounting for AI-powered applications.")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


@cache
def console() -> Console:
    from rich.console import Console

    return Console()


@cache
def err_console() -> Console:
    from rich.console import Console

    return Console(stderr=True)


def settings() -> Settings:
    """The settings from the environment; a bad one ends the command in one line."""
    from tokenledger.config import settings_from_env
    from tokenledger.errors import ConfigurationError

    try:
        return settings_from_env()
    except ConfigurationError as exc:
        fail(str(exc), ExitCode.UNEXPECTED)


def fail(message: str, code: int = 2) -> NoReturn:
    err_console().print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"tokenledger {version('tokenledger')}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True,
        help="Print the version and exit.")] = False) -> None:
    """tokenledger: token (credit) accounting for AI-powered applications."""
