"""The ``tokenledger`` command line. Errors are one clear line, never a traceback."""

from __future__ import annotations

import json
import os
import sys
from typing import Any, NoReturn

import typer
from rich.console import Console
from sqlalchemy.exc import OperationalError, ProgrammingError

from tokenledger.config import Settings, get_settings
from tokenledger.errors import TokenLedgerError

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
                  help="tokenledger: token (credit) accounting for AI-powered applications.")
console = Console()
err_console = Console(stderr=True)


def settings() -> Settings:
    try:
        return get_settings()
    except Exception as exc:  # pydantic ValidationError names the variable
        fail(f"configuration: {exc}")


def fail(message: str, code: int = 2) -> NoReturn:
    err_console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def main() -> None:
    """Entry point: run the CLI, turning known failures into one-line errors."""
    from tokenledger.logs import configure_logging

    # The CLI talks to people through rich output; log records (warnings and worse, JSON
    # lines unless TOKENLEDGER_LOG_JSON=false) go to stderr for whoever collects them.
    configure_logging("WARNING", os.environ.get("TOKENLEDGER_LOG_JSON", "true").lower()
                      not in ("0", "false", "no"))
    try:
        app()
    except TokenLedgerError as exc:
        err_console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except (OperationalError, ProgrammingError) as exc:
        first = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        missing = isinstance(exc, ProgrammingError) or "no such table" in first
        hint = " (run `tokenledger migrate`?)" if missing else ""
        err_console.print(f"[red]error:[/red] database: {first}{hint}", highlight=False,
                          soft_wrap=True)
        sys.exit(2)


# Command modules register themselves on ``app``; each issue's commands live apart.
from tokenledger.cli import (  # noqa: E402
    api_cmds,  # noqa: E402,F401
    ledger_cmds,  # noqa: E402,F401
    ops_cmds,  # noqa: E402,F401
    renew_cmds,  # noqa: E402,F401
    tokenprocess_cmds,  # noqa: E402,F401
)
