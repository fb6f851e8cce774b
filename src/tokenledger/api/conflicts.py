"""/api/conflicts: keys reused with another payload (recorded, never applied), for admins.
The rows come from the dashboard's conflicts query: one rule for both."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query

from tokenledger.api.auth import ADMIN, require
from tokenledger.api.deps import AUTH_ERRORS, Api
from tokenledger.api.schemas import ConflictsOut, Envelope
from tokenledger.dashboard import queries
from tokenledger.db.uow import unit_of_work

router = APIRouter(prefix="/api/conflicts", tags=["events"], responses=AUTH_ERRORS,
                   dependencies=[Depends(require(*ADMIN))])


@router.get("", response_model=Envelope[ConflictsOut],
            summary="Recorded conflicts, newest first, each beside its key's stored outcome")
def list_conflicts(
    api: Api,
    before: Annotated[int | None, Query(ge=1, le=2**63 - 1,
                                        description="Only conflicts older than this id")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> dict[str, Any]:
    with unit_of_work(api.settings) as uow:
        rows, more = queries.conflicts(uow.session, before, limit)
        total = queries.count_conflicts(uow.session)
    return {"success": True, "data": {
        "conflicts": rows, "total": total,
        "next_before": rows[-1]["id"] if more and rows else None}}
