"""One exception tree for tokenledger; each class says why it exists."""

from __future__ import annotations


class TokenLedgerError(Exception):
    """Base of every error tokenledger raises on purpose."""


class ValidationFailed(TokenLedgerError):
    """Input was malformed; the message names the field."""


class AccountNotFound(TokenLedgerError):
    """An event or query named a user_id that has no account."""

    def __init__(self, user_id: str) -> None:
        super().__init__(f"account not found: {user_id!r}")
        self.user_id = user_id


class InsufficientTokens(TokenLedgerError):
    """A charge needed more than the available balance (a decline, not a failure)."""

    def __init__(self, required: int, available: int) -> None:
        super().__init__(f"insufficient tokens (required {required}, available {available})")
        self.required = required
        self.available = available


class IdempotencyConflict(TokenLedgerError):
    """A key was reused with a different payload; the second event is never applied."""

    def __init__(self, key: str) -> None:
        super().__init__(f"conflict: key {key!r} was already used with a different payload")
        self.key = key


class CatalogError(TokenLedgerError):
    """A catalog file was refused; the message says which entry and why."""


class ResultTimeout(TokenLedgerError):
    """No outcome was stored for a key within the wait the caller allowed."""


class RetryableConflict(TokenLedgerError):
    """Two transactions raced (e.g. opened one account at once); retry the unit of work."""
