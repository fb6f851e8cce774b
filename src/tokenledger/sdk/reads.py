"""The seeds' service methods on ``LedgerClient`` (a mixin, so the client module stays
small): ``can_afford``, ``history``, ``statistics``, ``eligibility``, ``renew`` and
``reset_balance``.

Each is a thin call of the domain function the API and the CLI use for the same answer
(``ledger.reports``, ``renewals.service``, ``ledger.adjust``) in one unit of work, so one
rule lives in one place; the answers are the typed results of ``tokenledger.results``.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, TypeVar

from tokenledger.results import (
    Affordability,
    Entry,
    RenewalResult,
    ResetResult,
    Statistics,
    of,
)

if TYPE_CHECKING:
    from tokenledger.config import Settings
    from tokenledger.db.uow import UnitOfWork
    from tokenledger.renewals.service import Eligibility

T = TypeVar("T")


class ReadMethods:
    """The client's account reads and the two operator writes of the seeds."""

    settings: Settings

    def _in_unit(self, work: Callable[[UnitOfWork], T]) -> T:
        """``work(uow)`` in one unit of work, retried as the client's other quick calls."""
        from tokenledger.db.errors import QUICK
        from tokenledger.db.uow import unit_of_work

        def once() -> T:
            with unit_of_work(self.settings) as uow:
                return work(uow)

        return QUICK.run(once)

    def can_afford(self, user_id: str, feature: str) -> Affordability:
        """Whether ``user_id`` may use ``feature`` now: cost, balance, deficit, reason.
        Raises AccountNotFound, ValidationFailed for an unknown feature."""
        from tokenledger.ledger import reports

        return of(Affordability, self._in_unit(lambda uow: reports.can_afford(
            uow.session, user_id, feature, uow.catalog, uow.now)))

    def history(self, user_id: str, type: str | None = None, *,  # noqa: A002 - the seed's
                feature: str | None = None, since: datetime | None = None,
                until: datetime | None = None, limit: int = 50,
                offset: int = 0) -> list[Entry]:
        """The account's entries, newest first: of one ``type`` (``CHARGE``, ``REFUND``,
        …) and ``feature``, created in ``[since, until)``, ``limit`` from ``offset``."""
        from tokenledger.ledger import reports

        rows = self._in_unit(lambda uow: reports.history(
            uow.session, user_id, limit=limit, offset=offset, type_=type, feature=feature,
            start=since, end=until))
        return [of(Entry, row) for row in rows]

    def statistics(self, user_id: str, start: datetime | None = None,
                   end: datetime | None = None) -> Statistics:
        """Spent, refunded, earned, net change and operations in ``[start, end)``, with
        the breakdowns per type, feature and model in ``extra``."""
        from tokenledger.ledger import reports

        return of(Statistics, self._in_unit(lambda uow: reports.statistics(
            uow.session, user_id, start, end, catalog=uow.catalog)))

    def eligibility(self, user_id: str) -> Eligibility:
        """Whether the account's next grant (daily reset or 30-day renewal) is due now,
        and when it will be otherwise."""
        from tokenledger.renewals.service import eligibility

        return self._in_unit(lambda uow: eligibility(uow.session, user_id, uow.catalog,
                                                     uow.now))

    def renew(self, user_id: str) -> RenewalResult:
        """Renew the account now if it is due (once per period, shared with the scheduled
        runs); otherwise ``success`` is False and ``error`` says why."""
        from tokenledger.renewals.service import renew_account

        return self._in_unit(lambda uow: renew_account(uow, user_id))

    def reset_balance(self, user_id: str, balance: int, reason: str, *,
                      key: str | None = None) -> ResetResult:
        """Set the account's balance to ``balance`` by an audited ``ADJUSTMENT`` (the
        reason, the previous balance and the client in its metadata). With a ``key``, a
        retried reset answers its first result."""
        import uuid

        from tokenledger.ledger.adjust import reset_balance

        key = key or f"reset:{uuid.uuid4().hex}"  # one key for every try
        return self._in_unit(lambda uow: reset_balance(uow, user_id, balance, reason,
                                                       key=key))
