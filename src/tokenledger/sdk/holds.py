"""``LedgerClient.extend``: grow an open hold while a stream runs (a mixin, so the client
module stays small)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokenledger.messages import validated
from tokenledger.results import ExtendResult

if TYPE_CHECKING:
    from tokenledger.config import Settings


class HoldMethods:
    """The client's hold operations beyond start and end."""

    settings: Settings

    def extend(self, hold_id: int, by: int | None = None, *,
               to_output_tokens: int | None = None, input_tokens: int = 0,
               key: str | None = None) -> ExtendResult:
        """Grow open hold ``hold_id`` by ``by`` credits, or to what ``to_output_tokens``
        output tokens (after ``input_tokens``) cost with its model, in one transaction
        under the account lock, drawing as a start does.

        Answers ``extended`` (``held``: the new total), ``limit_reached`` (nothing drawn;
        ``available``: what is left) or ``closed``. With a ``key``, a retried extend
        answers its first result. Raises NotFound for an unknown hold, ValidationFailed
        for bad arguments.
        """
        from tokenledger.db.errors import QUICK
        from tokenledger.db.uow import unit_of_work
        from tokenledger.tokenprocess import extend as holds

        request = validated(holds.ExtendRequest, {
            "hold_id": hold_id, "by": by, "to_output_tokens": to_output_tokens,
            "input_tokens": input_tokens})
        key = key or holds.new_extend_key()  # one key for every try

        def once() -> ExtendResult:
            with unit_of_work(self.settings) as uow:
                return holds.extend(uow, request, key)

        return QUICK.run(once)
