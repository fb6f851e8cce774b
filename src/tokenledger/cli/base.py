"""The command line's application and the helpers every command module uses."""

from __future__ import annotations

import json
import sys
from functools import cache
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from typer.core import TyperGroup
from typer.exceptions import Abort, Exit, TyperException

if TYPE_CHECKING:
    from rich.console import Console

    from tokenledger.config import Settings



class _OneLineErrors(TyperGroup):
    """Every failure of a command ends as one line on stderr and exit code 2, never a
    traceback (``tokenledger`` and typer's CliRunner alike)."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (Exit, Abort, TyperException):  # an exit code, a usage error: typer's
            raise
        except Exception as exc:  # noqa: BLE001 - no traceback reaches a user
            from tokenledger.errors import as_ledger_error

            err_console().print(f"[red]error:[/red] {as_ledger_error(exc)}", highlight=False,
                                soft_wrap=True)
            raise typer.Exit(2) from None


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
    from pydantic import ValidationError

    from tokenledger.config import get_settings

    try:
        return get_settings()
    except ValidationError as exc:
        fail("; ".join(
            f"TOKENLEDGER_{'_'.join(str(p) for p in e['loc']).upper()}: "
            f"{str(e['msg']).removeprefix('Value error, ')}"
            for e in exc.errors(include_url=False)))


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
