"""The unit of work: the one place a transaction begins and ends.

A task, an HTTP route or a CLI command opens one; domain functions receive it, read and
write through ``uow.session``, judge time by ``uow.now``, price with ``uow.catalog``, and
register what must happen only once the transaction is durable (balance notices,
follow-up tasks, alerts) with :meth:`UnitOfWork.after_commit`. Nothing in the domain
commits, and nothing registered runs for work that rolled back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from functools import cached_property
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from tokenledger.db.engine import session_factory
from tokenledger.timeutil import utcnow

if TYPE_CHECKING:
    from tokenledger.catalog.service import Catalog
    from tokenledger.config import Settings

log = logging.getLogger("tokenledger.db")


class UnitOfWork:
    """One transaction and what it needs: session, instant, settings, catalog."""

    def __init__(self, settings: Settings, session: Session, now: datetime) -> None:
        self.settings = settings
        self.session = session
        self.now = now
        self._after_commit: list[Callable[[], Any]] = []
        session.info["uow"] = self

    @cached_property
    def catalog(self) -> Catalog:
        """The stored catalog (cached per process, re-checked at most once a second)."""
        from tokenledger.catalog.service import current_catalog

        return current_catalog(self.session)

    def after_commit(self, action: Callable[[], Any]) -> None:
        """Run ``action()`` once this unit of work has committed (never if it rolls back).

        Actions run in order, after the transaction ended; one that raises is logged and
        does not stop the others (the work they follow is already durable)."""
        self._after_commit.append(action)

    def _committed(self) -> None:
        actions, self._after_commit = self._after_commit, []
        for action in actions:
            try:
                action()
            except Exception:  # noqa: BLE001 - the committed work stands regardless
                log.exception("an after-commit action failed")


def uow_of(session: Session) -> UnitOfWork | None:
    """The unit of work ``session`` belongs to (None: a session opened outside one), for
    the few functions handed only a session that must register after-commit work."""
    return session.info.get("uow")


@contextmanager
def unit_of_work(settings: Settings, *, now: datetime | None = None) -> Iterator[UnitOfWork]:
    """One transaction: commits when the block ends, rolls back if it raises; then runs
    the actions registered with ``after_commit``."""
    session = session_factory(settings.ledger_url())()
    uow = UnitOfWork(settings, session, now or utcnow())
    try:
        with session.begin():
            yield uow
    finally:
        session.close()
    uow._committed()
