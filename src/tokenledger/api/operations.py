"""Health and metrics: ``/healthz``, ``/readyz`` and ``/metrics`` (no API key)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from tokenledger.api.schemas import ErrorBody

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="The process is up")
async def healthz() -> dict[str, Any]:
    return {"success": True, "data": {"status": "ok"}}


@router.get("/readyz", summary="The database and the broker answer",
            responses={503: {"model": ErrorBody}})
def readyz(request: Request) -> JSONResponse:
    from tokenledger.ops.health import readiness

    ok, results = readiness(request.app.state.api.settings)
    checks = {c.name: "ok" if c.ok else f"unavailable ({c.detail})" for c in results}
    body = {"success": ok, "message": None if ok else "not ready", "data": checks}
    if not ok:
        body["status"] = 503
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
def metrics(request: Request) -> Response:
    from tokenledger.ops.metrics import render

    payload, content_type = render(request.app.state.api.settings)
    return Response(payload, media_type=content_type)
