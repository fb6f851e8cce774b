"""One exception tree for tokenledger; each class says why it exists.

Everything the SDK, the CLI and the HTTP API raise on purpose is a ``TokenLedgerError``;
a failure of a library underneath (SQLAlchemy, psycopg, kombu, redis) reaches callers as
one of these, with the original chained as ``__cause__``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokenledger.results import StartResult


class TokenLedgerError(Exception):
    """Base of every error tokenledger raises on purpose."""


class ConfigurationError(TokenLedgerError):
    """A setting is missing or malformed; the message names the variable and the fix."""


class ValidationFailed(TokenLedgerError):
    """Input was malformed; the message names the field."""


class AccountNotFound(TokenLedgerError):
    """An event or query named a user_id that has no account."""

    def __init__(self, user_id: str) -> None:
        super().__init__(f"account not found: {user_id!r}")
        self.user_id = user_id


class AccountExists(TokenLedgerError):
    """An account was opened again with other settings (another plan): it is left as it
    is, and the message names the plan it has."""

    def __init__(self, user_id: str, plan: str) -> None:
        super().__init__(f"account {user_id!r} exists with plan {plan}")
        self.user_id = user_id
        self.plan = plan


class NotFound(TokenLedgerError):
    """Something named by id (a dead letter, a hold, a run, an event key) does not exist."""


class InsufficientTokens(TokenLedgerError):
    """A charge needed more than the available balance (a decline, not a failure)."""

    def __init__(self, required: int, available: int) -> None:
        super().__init__(f"insufficient tokens (required {required}, available {available})")
        self.required = required
        self.available = available


class Conflict(TokenLedgerError):
    """A key was reused with a different payload; the second request is never applied."""

    def __init__(self, key: str, stored: Any = None) -> None:
        super().__init__(f"conflict: key {key!r} was already used with a different payload")
        self.key = key
        self.stored = stored


# The name the SDK has always exported.
IdempotencyConflict = Conflict


class CatalogError(TokenLedgerError):
    """A catalog file was refused; the message says which entry and why."""


class ResultTimeout(TokenLedgerError):
    """No outcome was stored for a key within the wait the caller allowed."""


class FeatureNotAccessible(TokenLedgerError):
    """A token process could not start (feature not in the plan, or too few tokens)."""

    def __init__(self, result: StartResult) -> None:
        super().__init__(f"{result.message or 'not accessible'} (available {result.token})")
        self.result = result


class BalanceReached(TokenLedgerError):
    """A streaming token process reached what the account can pay: stop the stream.

    Raised by ``TokenStream.add_output`` for the chunk that would go past it (that chunk
    is not counted: do not deliver it). Leaving the ``with`` block by this exception is a
    normal stop: the block swallows it and settles the usage counted so far.
    """

    def __init__(self, held: int, output_tokens: int) -> None:
        super().__init__(f"balance reached: {held} token(s) held cover {output_tokens} "
                         "output token(s)")
        self.held = held
        self.output_tokens = output_tokens


class AccessDenied(TokenLedgerError):
    """The HTTP API refused the client's key (401: unknown or revoked; 403: its scope
    does not allow the route)."""


class ServiceUnavailable(TokenLedgerError):
    """A server tokenledger needs cannot be reached; retry later."""


class DatabaseUnavailable(ServiceUnavailable):
    """The ledger database cannot be reached (TOKENLEDGER_DATABASE_URL)."""


class BrokerUnavailable(ServiceUnavailable):
    """The broker cannot be reached (TOKENLEDGER_BROKER_URL)."""


class NotMigrated(TokenLedgerError):
    """The database has no tokenledger schema (or an older one): run `tokenledger migrate`."""


class RetryableConflict(TokenLedgerError):
    """Two transactions raced (e.g. opened one account at once); retry the unit of work."""


def as_ledger_error(exc: BaseException) -> TokenLedgerError:
    """``exc`` as tokenledger's own error, naming the service or setting and the fix (the
    original is the result's ``__cause__``). Anything unknown becomes a generic error
    whose message names its type, never a traceback."""
    if isinstance(exc, TokenLedgerError):
        return exc
    error = _translate(exc)
    error.__cause__ = exc
    return error


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip()
    return text.splitlines()[0] if text else type(orig).__name__


def _translate(exc: BaseException) -> TokenLedgerError:
    import psycopg
    from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError

    from tokenledger.ops.logs import scrub

    if isinstance(exc, ArgumentError | NoSuchModuleError):
        return ConfigurationError(f"TOKENLEDGER_DATABASE_URL: {scrub(_first_line(exc))}")
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    if isinstance(orig, psycopg.errors.UndefinedTable | psycopg.errors.UndefinedColumn):
        return NotMigrated("the database has no tokenledger schema, or an older one: run "
                           "`tokenledger migrate` (TOKENLEDGER_DATABASE_URL)")
    if isinstance(orig, psycopg.OperationalError):
        return DatabaseUnavailable(
            f"database unavailable: {scrub(_first_line(exc))} (is PostgreSQL running? "
            "check TOKENLEDGER_DATABASE_URL)")
    if isinstance(orig, psycopg.Error):
        return TokenLedgerError(f"database error: {scrub(_first_line(exc))}")
    name = f"{type(exc).__module__}.{type(exc).__name__}"
    if name.startswith(("kombu.", "redis.", "amqp.")) or isinstance(exc, ConnectionError):
        return BrokerUnavailable(
            f"broker unavailable: {scrub(_first_line(exc))} (is Redis or RabbitMQ running? "
            "check TOKENLEDGER_BROKER_URL)")
    return TokenLedgerError(f"{type(exc).__name__}: {scrub(_first_line(exc))}")
