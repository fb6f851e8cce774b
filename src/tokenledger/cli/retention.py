"""``retention``: compact old entries into carry-forwards (placeholder)."""

from __future__ import annotations

import typer

from tokenledger.cli.base import app

retention_app = typer.Typer(no_args_is_help=True, help="Data retention.")
app.add_typer(retention_app, name="retention")
