"""POST /api/token-process/extend: the SDK's extend over HTTP."""

from __future__ import annotations

import httpx
import pytest

from tests.api.support import api_server, auth, http, keys
from tests.support import assert_verified
from tests.tokenprocess.test_extend import opened
from tokenledger import LedgerClient, Settings

__all__ = ["api_server", "http", "keys"]  # fixtures used by name
pytestmark = pytest.mark.services


def test_extend_route(http: httpx.Client, keys: dict[str, str], client: LedgerClient,
                      db: Settings) -> None:
    user = opened(db)
    start = client.token_process_start(user, "text_generation", hold=10)
    path = "/api/token-process/extend"
    r = http.post(path, json={"hold_id": start.hold_id, "by": 20},
                  headers=auth(keys["producer"], **{"Idempotency-Key": "x1"}))
    assert r.status_code == 200, r.text
    assert (r.json()["data"]["status"], r.json()["data"]["held"]) == ("extended", 30)
    again = http.post(path, json={"hold_id": start.hold_id, "by": 20},
                      headers=auth(keys["producer"], **{"Idempotency-Key": "x1"}))
    assert again.json()["data"]["held"] == 30
    limit = http.post(path, json={"hold_id": start.hold_id, "by": 1000},
                      headers=auth(keys["producer"]))
    assert limit.json()["data"]["status"] == "limit_reached"
    assert limit.json()["data"]["available"] == 70
    assert http.post(path, json={"hold_id": start.hold_id},
                     headers=auth(keys["producer"])).status_code == 422
    assert http.post(path, json={"hold_id": 999999999, "by": 1},
                     headers=auth(keys["producer"])).status_code == 404
    assert http.post(path, json={"hold_id": start.hold_id, "by": 1},
                     headers=auth(keys["reader"])).status_code == 403
    assert_verified(db)
