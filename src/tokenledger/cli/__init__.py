"""The ``tokenledger`` command line: one module per noun, errors as one line.

Command modules import what they need inside each command, so ``tokenledger --help`` and
a read like ``tokenledger balance USER`` load only what they use.
"""

from __future__ import annotations

import os

from tokenledger.cli import (  # noqa: F401 - each registers its commands on the app
    accounts,
    catalog,
    conflicts,
    dashboard,
    dlq,
    holds,
    keys,
    ledger,
    ops,
    publish,
    renew,
    retention,
    services,
    tokenprocess,
    webhooks,
)
from tokenledger.cli.base import app

__all__ = ["app", "main"]


def main() -> None:
    """Entry point: run the CLI, turning every failure into one line on stderr."""
    from tokenledger.ops.logs import configure_logging

    # The CLI talks to people through rich output; log records (warnings and worse, JSON
    # lines unless TOKENLEDGER_LOG_JSON=false) go to stderr for whoever collects them.
    configure_logging("WARNING", os.environ.get("TOKENLEDGER_LOG_JSON", "true").lower()
                      not in ("0", "false", "no"))
    app()
