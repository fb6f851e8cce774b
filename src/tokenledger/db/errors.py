"""What a failed unit of work means, decided once: wait, retry, or give up on the input.

Every retry loop in tokenledger (a task, the SDK's start, the API's start pool, a renewal
run driven from the CLI) asks :func:`classify` and follows a :class:`RetryPolicy`.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from tokenledger.errors import RetryableConflict

T = TypeVar("T")


class Failure(enum.Enum):
    UNAVAILABLE = "unavailable"  # the database cannot be reached: wait it out, lose nothing
    TRANSIENT = "transient"  # a race (deadlock, serialization, a key taken meanwhile)
    PERMANENT = "permanent"  # the input fails the same way every time: isolate it


_RACES = {
    "40001",  # serialization_failure
    "40P01",  # deadlock_detected
    "55P03",  # lock_not_available
    "23505",  # unique_violation: two writers raced to create the same key or wallet
}
_UNREACHABLE_PREFIXES = ("08", "57P", "53")  # connection, shutdown, resources


def _sqlstate(exc: BaseException) -> str | None:
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    return getattr(orig, "sqlstate", None)


def classify(exc: BaseException) -> Failure:
    """How to treat ``exc`` raised by a unit of work (SQLAlchemy or psycopg errors)."""
    import psycopg

    if isinstance(exc, RetryableConflict):
        return Failure.TRANSIENT
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return Failure.UNAVAILABLE
    state = _sqlstate(exc)
    if state in _RACES:
        return Failure.TRANSIENT
    if state is not None and state.startswith(_UNREACHABLE_PREFIXES):
        return Failure.UNAVAILABLE
    if isinstance(exc, IntegrityError | psycopg.IntegrityError):
        return Failure.PERMANENT  # a check, a foreign key or NOT NULL: the input is wrong
    if isinstance(exc, OperationalError | psycopg.OperationalError) and state is None:
        return Failure.UNAVAILABLE  # no answer from the server at all
    if stale_statements(exc):
        return Failure.TRANSIENT
    return Failure.PERMANENT


def is_transient(exc: BaseException) -> bool:
    """Worth running the whole unit of work again (a race, or the database was away)."""
    return classify(exc) is not Failure.PERMANENT


def stale_statements(exc: BaseException) -> bool:
    """A connection's prepared statements no longer fit the schema: a migration changed a
    column they answer ("cached plan must not change result type"), or they are gone (a
    pooler discarded them). Only a new connection helps."""
    import psycopg

    return isinstance(exc, psycopg.errors.InvalidSqlStatementName) or (
        isinstance(exc, psycopg.errors.FeatureNotSupported)
        and "cached plan must not change result type" in str(exc))


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how soon a transient failure is tried again."""

    attempts: int = 3  # tries in all, the first included
    first_delay: float = 0.01  # seconds before the second try
    max_delay: float = 30.0
    factor: float = 2.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed try number ``attempt`` (1-based)."""
        return min(self.max_delay, self.first_delay * self.factor ** (attempt - 1))

    def run(self, work: Callable[[], T], sleep: Callable[[float], None] = time.sleep) -> T:
        """``work()`` until it succeeds, fails permanently, or the tries run out (then the
        last error is raised)."""
        attempt = 0
        while True:
            try:
                return work()
            except Exception as exc:
                attempt += 1
                if attempt >= self.attempts or not is_transient(exc):
                    raise
                sleep(self.delay(attempt))


# A synchronous write a caller waits for (a start, an account opened by the SDK): a few
# quick tries, so a deadlock or a dropped connection costs milliseconds, not an error.
QUICK = RetryPolicy(attempts=3, first_delay=0.01, max_delay=0.05)
