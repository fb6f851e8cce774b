"""Errors of the token process."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokenledger.errors import TokenLedgerError

if TYPE_CHECKING:
    from tokenledger.tokenprocess.service import StartResult


class FeatureNotAccessible(TokenLedgerError):
    """A token process could not start (feature not in the plan, or too few tokens)."""

    def __init__(self, result: StartResult) -> None:
        super().__init__(f"{result.message or 'not accessible'} (available {result.token})")
        self.result = result
