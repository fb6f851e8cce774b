"""The HTTP API against the real stack: uvicorn, PostgreSQL, Redis and a real worker.

Seed examples are worked tests: the balance shape of seed 000, the start/end shapes and
the 401 body of seed 002, the statistics and monthly report of seeds 003/004.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlalchemy import select, text

from tests.api.support import KEY_CACHE_SECONDS, ServerThread, api_server, auth, http, keys
from tests.support import Worker, apply, assert_verified, run_cli, session_scope
from tokenledger import LedgerClient, Settings
from tokenledger.apikeys.service import ApiKey, create_key, revoke_key

pytestmark = pytest.mark.services
__all__ = ["api_server", "http", "keys"]  # fixtures used by name

INVALID_KEY_BODY = {"success": False, "status": 401, "message": "Invalid server API key"}
WALLET_FIELDS = {"id", "balanceTokens", "walletType", "isActive", "expiresAt"}


def open_account(http: httpx.Client, key: str, user_id: str, **fields: str) -> dict:
    r = http.post("/api/accounts", json={"user_id": user_id, **fields}, headers=auth(key))
    assert r.status_code == 201, r.text
    return r.json()["data"]


def balance(http: httpx.Client, key: str, user_id: str) -> dict:
    r = http.get("/api/billing/balance", params={"user_id": user_id}, headers=auth(key))
    assert r.status_code == 200, r.text
    return r.json()["data"]


def poll_event(http: httpx.Client, key: str, event_key: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        r = http.get(f"/api/events/{event_key}", headers=auth(key))
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        if data["status"] != "pending" or time.monotonic() > deadline:
            return data
        time.sleep(0.05)


# -- authentication and scopes --------------------------------------------------------------

ROUTES = [
    ("GET", "/api/billing/balance?user_id=u"),
    ("GET", "/api/billing/transactions?user_id=u"),
    ("GET", "/api/billing/wallets?user_id=u"),
    ("POST", "/api/billing/wallets"),
    ("GET", "/api/billing/daily-reset"),
    ("POST", "/api/billing/daily-reset"),
    ("GET", "/api/billing/can-afford?user_id=u&feature=chat"),
    ("POST", "/api/token-process/start"),
    ("POST", "/api/token-process/end"),
    ("POST", "/api/events"),
    ("GET", "/api/events/some-key"),
    ("POST", "/api/accounts"),
    ("GET", "/api/accounts/u/statistics"),
    ("GET", "/api/accounts/u/reports/monthly"),
    ("POST", "/api/renewals/run"),
    ("GET", "/api/renewals/runs"),
    ("GET", "/api/renewals/runs/1"),
]


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_every_api_route_answers_the_seed_401_without_a_valid_key(
        http: httpx.Client, keys: dict, method: str, path: str) -> None:
    producer = keys["producer"]
    wrong_secret = producer[:-4] + ("AAAA" if not producer.endswith("AAAA") else "BBBB")
    for headers in ({}, {"x-server-api-key": ""}, {"x-server-api-key": "nope"},
                    {"x-server-api-key": wrong_secret},
                    {"x-server-api-key": "x" * 5000}):
        r = http.request(method, path, headers=headers, json={"user_id": "u"})
        assert r.status_code == 401, (headers, r.text)
        assert r.json() == INVALID_KEY_BODY


@pytest.mark.parametrize("path", ["/api/accounts/a%0Ab/statistics", "/api/accounts/a/b/statistics",
                                  "/api/no-such-route", "/api/billing"])
def test_paths_no_route_matches_still_need_a_key_first(http: httpx.Client, keys: dict,
                                                       path: str) -> None:
    """Without a key nothing under /api/ tells which routes exist; with one, a 404."""
    r = http.get(path)
    assert (r.status_code, r.json()) == (401, INVALID_KEY_BODY)
    r = http.get(path, headers=auth(keys["reader"]))
    assert r.status_code == 404 and r.json()["success"] is False, r.text


SCOPE_MATRIX = {
    # route: scopes that may call it (admin may call everything)
    ("GET", "/api/billing/balance?user_id=u"): {"reader", "admin"},
    ("GET", "/api/billing/transactions?user_id=u"): {"reader", "admin"},
    ("GET", "/api/billing/wallets?user_id=u"): {"reader", "admin"},
    ("GET", "/api/billing/can-afford?user_id=u&feature=chat"): {"reader", "admin"},
    ("GET", "/api/accounts/u/statistics"): {"reader", "admin"},
    ("GET", "/api/accounts/u/reports/monthly"): {"reader", "admin"},
    ("GET", "/api/events/some-key"): {"reader", "producer", "admin"},
    ("POST", "/api/token-process/start"): {"producer", "admin"},
    ("POST", "/api/token-process/end"): {"producer", "admin"},
    ("POST", "/api/events"): {"producer", "admin"},
    ("POST", "/api/accounts"): {"producer", "admin"},
    ("POST", "/api/billing/wallets"): {"producer", "admin"},
    ("GET", "/api/billing/daily-reset"): {"admin"},
    ("POST", "/api/billing/daily-reset"): {"admin"},
    ("POST", "/api/renewals/run"): {"admin"},
    ("GET", "/api/renewals/runs"): {"admin"},
}


def test_scopes_allow_exactly_their_routes_and_others_get_403(http: httpx.Client,
                                                               keys: dict) -> None:
    for (method, path), allowed in SCOPE_MATRIX.items():
        for scope, key in keys.items():
            # An empty JSON object: allowed callers get past auth and fail validation (422)
            # or find no account (404); the daily-reset and renewal runs accept it.
            r = http.request(method, path, headers=auth(key), json={},
                             params={"wait": 0} if "run" in path or "reset" in path else None)
            if scope in allowed:
                assert r.status_code not in (401, 403), (scope, method, path, r.text)
            else:
                assert r.status_code == 403, (scope, method, path, r.text)
                body = r.json()
                assert body["success"] is False and body["status"] == 403
                assert scope in body["message"]


def test_a_revoked_key_stops_working_within_the_cache_time(http: httpx.Client, keys: dict,
                                                          db: str) -> None:
    with session_scope(db) as session:
        created = create_key(session, "reader", "to revoke")
    r = http.get("/api/accounts/nobody/statistics", headers=auth(created.key))
    assert r.status_code == 404  # authenticated: the account is what is missing
    with session_scope(db) as session:
        assert revoke_key(session, created.info.prefix).revoked_at is not None
    time.sleep(KEY_CACHE_SECONDS + 0.2)
    r = http.get("/api/accounts/nobody/statistics", headers=auth(created.key))
    assert r.status_code == 401 and r.json() == INVALID_KEY_BODY


def test_keys_are_stored_hashed_never_in_clear(keys: dict, db: str) -> None:
    with session_scope(db) as session:
        rows = session.execute(select(ApiKey)).scalars().all()
        dump = json.dumps([[str(getattr(r, c.key)) for c in ApiKey.__table__.columns]
                           for r in rows])
    assert len(rows) == 3
    for key in keys.values():
        assert key not in dump
        assert key.split("_", 2)[2] not in dump  # not even the secret part


def test_keys_cli_creates_shows_once_lists_and_revokes(http: httpx.Client, settings: Settings,
                                                       db: str) -> None:
    def cli(*args: str):
        return run_cli(settings, *args)

    created = cli("keys", "create", "--scope", "producer", "--name", "ci", "--json")
    assert created.exit_code == 0, created.stderr
    info = json.loads(created.stdout)
    assert info["scope"] == "producer" and info["key"].startswith(f"tl_{info['prefix']}_")
    r = http.post("/api/accounts", json={"user_id": "cli-user"},
                  headers=auth(info["key"]))
    assert r.status_code == 201, r.text

    listed = cli("keys", "list", "--json")
    assert listed.exit_code == 0, listed.stderr
    assert info["key"] not in listed.stdout
    assert [k["prefix"] for k in json.loads(listed.stdout)] == [info["prefix"]]

    bad = cli("keys", "create", "--scope", "root")
    assert bad.exit_code == 2 and "scope" in bad.stderr

    revoked = cli("keys", "revoke", info["prefix"])
    assert revoked.exit_code == 0, revoked.stderr
    time.sleep(KEY_CACHE_SECONDS + 0.2)
    r = http.post("/api/accounts", json={"user_id": "cli-user-2"},
                  headers=auth(info["key"]))
    assert r.status_code == 401
    again = cli("keys", "list", "--all", "--json")
    assert json.loads(again.stdout)[0]["revoked_at"] is not None
    assert cli("keys", "revoke", "zzzzzzzzzzzz").exit_code == 2


# -- seed 000: balance, wallets, transactions ---------------------------------------------


def test_seed_000_balance_has_the_seed_shape(http: httpx.Client, keys: dict) -> None:
    """Given a new Free account, the balance reads as seed 000 shows it."""
    open_account(http, keys["producer"], "user-123")
    r = http.get("/api/billing/balance", params={"user_id": "user-123"},
                 headers=auth(keys["reader"]))
    assert r.status_code == 200
    body = r.json()
    assert body["success"] is True
    data = body["data"]
    assert data["balance"] == 5
    assert data["canCreateProject"] is True
    assert data["requiredTokens"] == 1
    assert len(data["wallets"]) == 1
    wallet = data["wallets"][0]
    assert set(wallet) == WALLET_FIELDS
    assert wallet["balanceTokens"] == 5 and wallet["walletType"] == "STANDARD"
    assert wallet["isActive"] is True and wallet["expiresAt"] is None


def test_balance_at_a_moment_answers_from_the_ledger_with_holds_apart(
        http: httpx.Client, keys: dict, db: Settings) -> None:
    """Given an account opened two days ago that held 1 for a start yesterday (still open),
    its balance as of yesterday after the hold is 4 with 1 held; as of before it opened,
    no wallet; without ``at`` the seed's shape is unchanged."""
    from tokenledger.db.uow import unit_of_work
    from tokenledger.messages import StartRequest
    from tokenledger.tokenprocess import service as token_process

    t0 = datetime.now(UTC) - timedelta(days=2)
    apply(db, {"type": "open_account", "key": "open:at", "user_id": "at"}, now=t0)
    with unit_of_work(db, now=t0 + timedelta(days=1)) as uow:
        token_process.start(uow, StartRequest(user_id="at", hold=1,
                                              feature_endpoint_id="project_creation"), "h-at")
    r = http.get("/api/billing/balance", headers=auth(keys["reader"]), params={
        "user_id": "at", "at": (t0 + timedelta(days=1, hours=1)).isoformat()})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert (data["balance"], data["heldTokens"]) == (4, 1)
    assert [(w["walletType"], w["balanceTokens"], w["heldTokens"]) for w in data["wallets"]] \
        == [("STANDARD", 4, 1)]
    early = http.get("/api/billing/balance", headers=auth(keys["reader"]), params={
        "user_id": "at", "at": (t0 - timedelta(days=1)).isoformat()}).json()["data"]
    assert (early["balance"], early["wallets"]) == (0, [])
    assert set(balance(http, keys["reader"], "at")) == {
        "userId", "plan", "balance", "available", "canCreateProject", "requiredTokens",
        "wallets"}
    bad = http.get("/api/billing/balance", headers=auth(keys["reader"]),
                   params={"user_id": "at", "at": "yesterday"})
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "at"


def test_an_account_threshold_overrides_the_plans(http: httpx.Client, keys: dict,
                                                  db: Settings) -> None:
    open_account(http, keys["producer"], "thr")
    r = http.put("/api/accounts/thr/low-balance-threshold", json={"threshold": 4},
                 headers=auth(keys["admin"]))
    assert r.status_code == 200 and r.json()["data"] == {"userId": "thr", "threshold": 4}
    assert http.put("/api/accounts/thr/low-balance-threshold", json={"threshold": 4},
                    headers=auth(keys["producer"])).status_code == 403
    apply(db, {"type": "charge", "key": "thr-1", "user_id": "thr", "amount": 1})
    with session_scope(db) as session:  # 4 <= its own threshold (the plan's is 1)
        low = session.execute(text("SELECT balance, threshold FROM low_balance_state")).all()
    assert [tuple(row) for row in low] == [(4, 4)]
    r = http.put("/api/accounts/thr/low-balance-threshold", json={"threshold": None},
                 headers=auth(keys["admin"]))
    assert r.json()["data"]["threshold"] is None
    assert http.put("/api/accounts/nobody/low-balance-threshold", json={"threshold": 1},
                    headers=auth(keys["admin"])).status_code == 404


def test_seed_000_a_premium_wallet_adds_to_the_balance(http: httpx.Client, keys: dict,
                                                       worker: Worker) -> None:
    """Given 5 STANDARD tokens, when a PREMIUM wallet of 10 is created, the total is 15
    and GET /wallets lists both, as in seed 000's example."""
    open_account(http, keys["producer"], "user-123")
    r = http.post("/api/billing/wallets", headers=auth(keys["producer"]), json={
        "user_id": "user-123", "walletType": "PREMIUM", "initialTokens": 10,
        "expiresAt": "2099-12-31T23:59:59Z"})
    assert r.status_code == 201, r.text
    created = r.json()["data"]
    assert created["status"] == "applied" and created["totalBalance"] == 15
    assert created["wallet"]["walletType"] == "PREMIUM"
    assert created["wallet"]["balanceTokens"] == 10
    assert created["wallet"]["expiresAt"].startswith("2099-12-31T23:59:59")

    r = http.get("/api/billing/wallets", params={"user_id": "user-123"},
                 headers=auth(keys["reader"]))
    data = r.json()["data"]
    assert data["totalBalance"] == 15
    assert data["canCreateProject"] is True and data["requiredTokens"] == 1
    assert [(w["walletType"], w["balanceTokens"]) for w in data["wallets"]] == [
        ("STANDARD", 5), ("PREMIUM", 10)]
    assert all(set(w) == WALLET_FIELDS for w in data["wallets"])
    assert balance(http, keys["reader"], "user-123")["balance"] == 15

    # The same key again is the same credit: applied once.
    again = http.post("/api/billing/wallets", headers=auth(keys["producer"]), json={
        "user_id": "user-123", "walletType": "PREMIUM", "initialTokens": 10,
        "expiresAt": "2099-12-31T23:59:59Z", "key": created["key"]})
    assert again.status_code == 201 and again.json()["data"]["totalBalance"] == 15
    # ... and reusing it for another amount is refused, not applied.
    clash = http.post("/api/billing/wallets", headers=auth(keys["producer"]), json={
        "user_id": "user-123", "walletType": "PREMIUM", "initialTokens": 11,
        "expiresAt": "2099-12-31T23:59:59Z", "key": created["key"]})
    assert clash.status_code == 409 and clash.json()["data"]["status"] == "conflict"
    assert balance(http, keys["reader"], "user-123")["balance"] == 15


def test_wallet_creation_refuses_bad_input_and_unknown_accounts(http: httpx.Client,
                                                                keys: dict) -> None:
    open_account(http, keys["producer"], "w1")
    key = keys["producer"]
    cases = [
        ({"user_id": "w1", "initialTokens": 0}, "initialTokens"),
        ({"user_id": "w1", "initialTokens": 10**13}, "initialTokens"),
        ({"user_id": "w1", "initialTokens": "10"}, "initialTokens"),
        ({"user_id": "w1", "initialTokens": 5, "walletType": "premium"}, "walletType"),
        ({"user_id": "w1", "initialTokens": 5, "expiresAt": "2001-01-01T00:00:00Z"},
         "expiresAt"),
        ({"user_id": "w1", "initialTokens": 5, "expiresAt": "0001-01-01T00:00:00+14:00"},
         "expiresAt"),
        ({"user_id": "w1", "initialTokens": 5, "walletType": "STANDARD",
          "expiresAt": "2099-01-01T00:00:00Z"}, "expiresAt"),
        ({"initialTokens": 5}, "user_id"),
    ]
    for body, field in cases:
        r = http.post("/api/billing/wallets", json=body, headers=auth(key))
        assert r.status_code == 422, (body, r.text)
        assert field in [e["field"] for e in r.json()["errors"]], r.text
    r = http.post("/api/billing/wallets", json={"user_id": "ghost", "initialTokens": 5},
                  headers=auth(key))
    assert r.status_code == 404
    assert r.json() == {"success": False, "status": 404,
                        "message": "Account not found: ghost"}


def test_wallet_creation_can_answer_at_once_with_prefer_respond_async(
        http: httpx.Client, keys: dict, worker: Worker) -> None:
    open_account(http, keys["producer"], "w2")
    r = http.post("/api/billing/wallets", json={"user_id": "w2", "initialTokens": 7},
                  headers=auth(keys["producer"], prefer="respond-async"))
    assert r.status_code == 202
    key = r.json()["data"]["key"]
    assert poll_event(http, keys["reader"], key)["status"] == "applied"
    assert balance(http, keys["reader"], "w2")["balance"] == 12


def test_transactions_have_the_seed_fields_and_filter_and_paginate(
        http: httpx.Client, keys: dict, db: str) -> None:
    t0 = datetime(2025, 3, 1, tzinfo=UTC)
    apply(db, {"type": "open_account", "key": "o", "user_id": "tx", "plan": "Gift"}, now=t0)
    for i in range(5):
        apply(db, {"type": "charge", "key": f"c{i}", "user_id": "tx",
                   "feature": "image_generation" if i % 2 else "chatgpt_message",
                   "metadata": {"projectId": f"proj-{i}"}}, now=t0 + timedelta(days=i + 1))
    apply(db, {"type": "refund", "key": "r1", "user_id": "tx", "original_key": "c1",
               "reason": "operation_failed"}, now=t0 + timedelta(days=10))
    reader = auth(keys["reader"])

    r = http.get("/api/billing/transactions", params={"user_id": "tx"}, headers=reader)
    rows = r.json()["data"]
    assert [row["eventKey"] for row in rows] == ["r1", "c4", "c3", "c2", "c1", "c0", "o"]
    first_charge = rows[-2]
    assert {"id", "userId", "walletId", "amount", "type", "description", "metadata",
            "createdAt", "balanceBefore", "balanceAfter", "feature", "eventKey"} <= set(
        first_charge)
    assert first_charge["userId"] == "tx" and first_charge["amount"] == -5
    assert first_charge["type"] == "CHARGE"
    assert first_charge["description"] == "Charge for chatgpt_message"
    assert first_charge["metadata"] == {"projectId": "proj-0"}
    assert first_charge["createdAt"].startswith("2025-03-02T00:00:00")
    assert first_charge["balanceAfter"] == first_charge["balanceBefore"] - 5
    assert rows[0]["type"] == "REFUND" and rows[0]["reference"] == "c1"

    page = http.get("/api/billing/transactions",
                    params={"user_id": "tx", "limit": 2, "offset": 1}, headers=reader)
    assert [row["eventKey"] for row in page.json()["data"]] == ["c4", "c3"]
    charges = http.get("/api/billing/transactions",
                       params={"user_id": "tx", "type": "CHARGE",
                               "feature": "image_generation"}, headers=reader)
    assert [row["eventKey"] for row in charges.json()["data"]] == ["c3", "c1"]
    window = http.get("/api/billing/transactions",
                      params={"user_id": "tx", "start": "2025-03-03T00:00:00Z",
                              "end": "2025-03-05"}, headers=reader)
    assert [row["eventKey"] for row in window.json()["data"]] == ["c2", "c1"]

    for params, field in (({"user_id": "tx", "type": "PROJECT"}, "type"),
                          ({"user_id": "tx", "limit": 0}, "limit"),
                          ({"user_id": "tx", "limit": 1001}, "limit"),
                          ({"user_id": "tx", "offset": -1}, "offset"),
                          ({"user_id": "tx", "start": "yesterday"}, "start"),
                          ({"user_id": "tx", "start": "2025-03-05", "end": "2025-03-01"},
                           "end"),
                          ({"user_id": "t\x00x"}, "user_id"),
                          ({"user_id": "x" * 129}, "user_id"),
                          ({}, "user_id")):
        r = http.get("/api/billing/transactions", params=params, headers=reader)
        assert r.status_code == 422, (params, r.text)
        body = r.json()
        assert body["success"] is False and body["status"] == 422
        assert field in [e["field"] for e in body["errors"]], body
        assert field in body["message"]
    r = http.get("/api/billing/transactions", params={"user_id": "nobody"}, headers=reader)
    assert r.status_code == 404


# -- can_afford (seed 003/004) --------------------------------------------------------------


def test_can_afford_reports_cost_balance_and_deficit(http: httpx.Client, keys: dict) -> None:
    open_account(http, keys["producer"], "ca")
    reader = auth(keys["reader"])

    def afford(feature: str) -> dict:
        r = http.get("/api/billing/can-afford", params={"user_id": "ca", "feature": feature},
                     headers=reader)
        assert r.status_code == 200, r.text
        return r.json()["data"]

    assert afford("project_creation") == {
        "userId": "ca", "feature": "project_creation", "canAfford": True, "cost": 1,
        "balance": 5, "available": 5, "deficit": 0, "reason": None}
    assert afford("chatgpt_message")["canAfford"] is True
    not_in_plan = afford("image_generation")
    assert not_in_plan["canAfford"] is False
    assert not_in_plan["reason"] == "Feature endpoint is not available in your package"
    # Holding 5 for a chat message leaves nothing: a project would need 1 more.
    r = http.post("/api/token-process/start", headers=auth(keys["producer"]),
                  json={"user_id": "ca", "feature_endpoint_id": "chatgpt_message"})
    assert r.json()["data"]["status"] == "accessible"
    short = afford("project_creation")
    assert (short["canAfford"], short["cost"], short["balance"], short["deficit"]) == (
        False, 1, 0, 1)
    assert balance(http, keys["reader"], "ca")["canCreateProject"] is False
    r = http.get("/api/billing/can-afford", params={"user_id": "ca", "feature": "teleport"},
                 headers=reader)
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "feature"


# -- seed 002: token process start / end ------------------------------------------------------


def test_seed_002_start_end_round_trip(http: httpx.Client, keys: dict,
                                       worker: Worker, db: str) -> None:
    """Given a Free account with 5 tokens, when a text generation starts and ends with
    100 input and 400 output tokens on gemini-pro, then the cost is
    ceil((100 + 400 × 4) / 1000 × 1.2) = 3 and the seed's shapes come back."""
    producer = auth(keys["producer"])
    open_account(http, keys["producer"], "user-123")
    r = http.post("/api/token-process/start", headers=producer, json={
        "user_id": "user-123", "feature_endpoint_id": "text_generation"})
    assert r.status_code == 200
    start = r.json()
    assert start["success"] is True and isinstance(start["message"], str)
    data = start["data"]
    assert data["user_id"] == "user-123" and data["status"] == "accessible"
    assert data["token"] == 4 and data["cost"] == 1 and data["hold_id"] > 0

    r = http.post("/api/token-process/end", headers=producer, json={
        "user_id": "user-123", "feature_endpoint_id": "text_generation",
        "input_token": 100, "output_token": 400, "model": "gemini-pro",
        "hold_id": data["hold_id"]})
    assert r.status_code == 200, r.text
    end = r.json()
    assert end["success"] is True and isinstance(end["message"], str)
    assert end["data"]["user_id"] == "user-123"
    assert end["data"]["cost"] == 3
    assert end["data"]["token"] == 2
    assert end["data"]["status"] == "returnable"
    assert balance(http, keys["reader"], "user-123")["balance"] == 2
    assert_verified(db)


def test_seed_002_end_without_start_as_the_seed_calls_it(http: httpx.Client, keys: dict,
                                                         worker: Worker) -> None:
    producer = auth(keys["producer"])
    open_account(http, keys["producer"], "plain")
    r = http.post("/api/token-process/end", headers=producer, json={
        "user_id": "plain", "feature_endpoint_id": "text_generation",
        "input_token": 1000, "output_token": 2000})
    assert r.status_code == 200, r.text
    # default model gemini-pro: ceil((1000 + 8000) / 1000 × 1.2) = 11 > 5 available;
    # text_generation allows overdraft, so STANDARD goes negative: not-returnable.
    data = r.json()["data"]
    assert (data["cost"], data["token"], data["status"]) == (11, -6, "not-returnable")
    assert "Insufficient tokens" in data["message"]


def test_seed_002_the_two_not_accessible_messages(http: httpx.Client, keys: dict) -> None:
    producer = auth(keys["producer"])
    open_account(http, keys["producer"], "user-123")
    r = http.post("/api/token-process/start", headers=producer, json={
        "user_id": "user-123", "feature_endpoint_id": "image_generation"})
    assert r.status_code == 200
    data = r.json()["data"]
    assert data["status"] == "not-accessible"
    assert data["message"] == "Feature endpoint is not available in your package"
    assert data["token"] == 5 and data["hold_id"] is None

    first = http.post("/api/token-process/start", headers=producer, json={
        "user_id": "user-123", "feature_endpoint_id": "chatgpt_message"})
    assert first.json()["data"]["status"] == "accessible"
    second = http.post("/api/token-process/start", headers=producer, json={
        "user_id": "user-123", "feature_endpoint_id": "chatgpt_message"})
    body = second.json()
    assert body["success"] is True
    assert body["data"]["status"] == "not-accessible"
    assert body["data"]["message"] == "Insufficient tokens"
    assert body["data"]["token"] == 0 and body["data"]["cost"] == 5


def test_seed_002_invalid_api_key_body(http: httpx.Client, keys: dict) -> None:
    for path in ("/api/token-process/start", "/api/token-process/end"):
        r = http.post(path, headers={"x-server-api-key": "your-server-api-key-here",
                                     "Content-Type": "application/json"},
                      json={"user_id": "user-123", "feature_endpoint_id": "x"})
        assert r.status_code == 401
        assert r.json() == {"success": False, "status": 401,
                            "message": "Invalid server API key"}


def test_start_is_idempotent_with_an_idempotency_key(http: httpx.Client, keys: dict) -> None:
    producer = auth(keys["producer"], **{"Idempotency-Key": "start-1"})
    open_account(http, keys["producer"], "idem")
    body = {"user_id": "idem", "feature_endpoint_id": "project_creation"}
    first = http.post("/api/token-process/start", headers=producer, json=body).json()["data"]
    again = http.post("/api/token-process/start", headers=producer, json=body).json()["data"]
    assert again["hold_id"] == first["hold_id"] and again["status"] == "accessible"
    assert balance(http, keys["reader"], "idem")["balance"] == 4
    clash = http.post("/api/token-process/start", headers=producer,
                      json={**body, "feature_endpoint_id": "chatgpt_message"})
    assert clash.status_code == 409 and clash.json()["status"] == 409


def test_start_and_end_validate_every_field(http: httpx.Client, keys: dict) -> None:
    producer = auth(keys["producer"])
    open_account(http, keys["producer"], "v")
    start_cases = [
        ({}, {"user_id", "feature_endpoint_id"}),
        ({"user_id": "", "feature_endpoint_id": "chat"}, {"user_id"}),
        ({"user_id": "v" * 129, "feature_endpoint_id": "chat"}, {"user_id"}),
        ({"user_id": "v", "feature_endpoint_id": "c" * 129}, {"feature_endpoint_id"}),
        ({"user_id": 5, "feature_endpoint_id": "chat"}, {"user_id"}),
        ({"user_id": "v", "feature_endpoint_id": "chat", "max_output_tokens": -1},
         {"max_output_tokens"}),
        ({"user_id": "v", "feature_endpoint_id": "chat", "hold": 10**13}, {"hold"}),
        ({"user_id": "v", "feature_endpoint_id": "chat", "surprise": 1}, {"surprise"}),
        ({"user_id": "v\x00", "feature_endpoint_id": "chat"}, {"user_id"}),
        ({"user_id": "\ud800", "feature_endpoint_id": "chat"}, {"user_id"}),
    ]
    for body, fields in start_cases:
        r = http.post("/api/token-process/start", content=json.dumps(body).encode(),
                      headers={**producer, "content-type": "application/json"})
        assert r.status_code == 422, (body, r.text)
        assert fields <= {e["field"] for e in r.json()["errors"]}, (body, r.text)
    end_base = {"user_id": "v", "feature_endpoint_id": "text_generation",
                "input_token": 1, "output_token": 1}
    end_cases = [
        ({**end_base, "input_token": -1}, "input_token"),
        ({**end_base, "output_token": 1.5}, "output_token"),
        ({**end_base, "output_token": 10**11}, "output_token"),
        ({**end_base, "hold_id": 0}, "hold_id"),
        ({**end_base, "hold_id": 2**64}, "hold_id"),
        ({**end_base, "model": ""}, "model"),
        ({**end_base, "feature_endpoint_id": "teleport"}, "feature_endpoint_id"),
        ({**end_base, "key": "k" * 256}, "key"),
        ({**end_base, "metadata": {"x": "y" * 17000}}, "metadata"),
        ({**end_base, "metadata": [1]}, "metadata"),
    ]
    for body, field in end_cases:
        r = http.post("/api/token-process/end", headers=producer, json=body)
        assert r.status_code == 422, (body, r.text)
        assert field in {e["field"] for e in r.json()["errors"]}, (body, r.text)
    for raw in (b"{", b"[]", b"null", b'"text"', b"\xff\xfe"):
        r = http.post("/api/token-process/start", content=raw,
                      headers={**producer, "content-type": "application/json"})
        assert r.status_code == 422, (raw, r.text)
    r = http.post("/api/token-process/start", headers=producer,
                  json={"user_id": "ghost", "feature_endpoint_id": "chat"})
    assert r.status_code == 404 and r.json()["message"] == "Account not found: ghost"
    r = http.post("/api/token-process/end", headers=producer, json={**end_base,
                                                                    "user_id": "ghost"})
    assert r.status_code == 404


def test_end_accepts_plural_field_names_and_is_idempotent_per_key(
        http: httpx.Client, keys: dict, worker: Worker) -> None:
    producer = auth(keys["producer"])
    open_account(http, keys["producer"], "e1")
    body = {"user_id": "e1", "feature_endpoint_id": "text_generation",
            "input_tokens": 500, "output_tokens": 0, "key": "end-e1",
            "metadata": {"requestId": "req-1"}}
    first = http.post("/api/token-process/end", headers=producer, json=body)
    assert first.status_code == 200, first.text
    assert first.json()["data"]["cost"] == 1  # ceil(500/1000 × 1.2) = 1
    again = http.post("/api/token-process/end", headers=producer, json=body)
    assert again.json()["data"] == first.json()["data"]
    assert balance(http, keys["reader"], "e1")["balance"] == 4
    rows = http.get("/api/billing/transactions", params={"user_id": "e1", "type": "CHARGE"},
                    headers=auth(keys["reader"])).json()["data"]
    assert rows[0]["metadata"]["requestId"] == "req-1"
    assert rows[0]["metadata"]["model"] == "gemini-pro"
    clash = http.post("/api/token-process/end", headers=producer,
                      json={**body, "input_tokens": 501})
    assert clash.status_code == 409 and clash.json()["data"]["status"] == "conflict"


def test_end_with_prefer_respond_async_answers_202_with_the_key(
        http: httpx.Client, keys: dict, worker: Worker) -> None:
    open_account(http, keys["producer"], "a1")
    r = http.post("/api/token-process/end",
                  headers=auth(keys["producer"], prefer="respond-async"),
                  json={"user_id": "a1", "feature_endpoint_id": "text_generation",
                        "input_token": 1000, "output_token": 0})
    assert r.status_code == 202, r.text
    key = r.json()["data"]["key"]
    assert r.json()["data"]["status"] == "pending"
    outcome = poll_event(http, keys["reader"], key)
    assert outcome["status"] == "applied"
    assert outcome["result"]["cost"] == 2 and outcome["result"]["status"] == "returnable"


def test_end_of_a_settled_hold_is_refused_with_409(http: httpx.Client, keys: dict,
                                                   worker: Worker) -> None:
    producer = auth(keys["producer"])
    open_account(http, keys["producer"], "h1")
    hold = http.post("/api/token-process/start", headers=producer, json={
        "user_id": "h1", "feature_endpoint_id": "text_generation"}).json()["data"]["hold_id"]
    body = {"user_id": "h1", "feature_endpoint_id": "text_generation", "input_token": 10,
            "output_token": 10, "hold_id": hold}
    assert http.post("/api/token-process/end", headers=producer, json=body).status_code == 200
    r = http.post("/api/token-process/end", headers=producer, json=body)
    assert r.status_code == 409
    assert r.json()["data"]["status"] == "rejected"
    assert "already settled" in r.json()["message"]


def test_end_answers_202_when_no_worker_stores_an_outcome_in_time(
        settings: Settings, keys: dict, db: str) -> None:
    """A bounded wait: with the workers stopped, end answers 202 and the key, not a hang."""
    idle = settings.model_copy(update={"queue": settings.queue + "-idle"})
    server = ServerThread(idle, end_wait=0.5).start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            open_account(c, keys["producer"], "slow")
            t0 = time.monotonic()
            r = c.post("/api/token-process/end", headers=auth(keys["producer"]),
                       json={"user_id": "slow", "feature_endpoint_id": "chat",
                             "input_token": 1, "output_token": 1})
            assert time.monotonic() - t0 < 5
            assert r.status_code == 202 and r.json()["data"]["status"] == "pending"
    finally:
        server.stop()
        with LedgerClient(idle) as client:
            client.producer.purge()


# -- events ----------------------------------------------------------------------------------


def test_events_one_or_a_batch_answer_202_with_keys(http: httpx.Client, keys: dict,
                                                    worker: Worker) -> None:
    producer = auth(keys["producer"])
    open_account(http, keys["producer"], "ev")
    r = http.post("/api/events", headers=producer, json={
        "type": "charge", "user_id": "ev", "feature": "project_creation", "key": "ev-1"})
    assert r.status_code == 202, r.text
    assert r.json()["data"] == {"keys": ["ev-1"], "count": 1}
    batch = [{"type": "charge", "user_id": "ev", "amount": 1},
             {"type": "credit", "user_id": "ev", "amount": 3, "wallet_type": "PROMO"},
             {"type": "refund", "user_id": "ev", "original_key": "ev-1"}]
    r = http.post("/api/events", headers=producer, json=batch)
    assert r.status_code == 202
    keys_out = r.json()["data"]["keys"]
    assert len(keys_out) == 3 and len(set(keys_out)) == 3
    outcomes = [poll_event(http, keys["reader"], k) for k in ["ev-1", *keys_out]]
    assert [o["status"] for o in outcomes] == ["applied"] * 4
    assert balance(http, keys["reader"], "ev")["balance"] == 5 - 1 - 1 + 3 + 1

    unknown = http.get("/api/events/never-published", headers=auth(keys["reader"]))
    assert unknown.status_code == 404 and unknown.json()["success"] is False


def test_events_are_validated_before_anything_is_published(http: httpx.Client, keys: dict,
                                                           worker: Worker) -> None:
    producer = auth(keys["producer"])
    open_account(http, keys["producer"], "ev2")
    batch = [{"type": "charge", "user_id": "ev2", "amount": 1, "key": "good-1"},
             {"type": "charge", "user_id": "ev2", "key": "bad-1"},
             {"type": "charge", "user_id": "ev2", "amount": -3, "key": "bad-2"},
             {"type": "teleport", "user_id": "ev2"},
             {"type": "credit", "user_id": "ev2", "amount": 1,
              "metadata": {"blob": "x" * 17000}},
             "not an object"]
    r = http.post("/api/events", headers=producer, json=batch)
    assert r.status_code == 422, r.text
    fields = [e["field"] for e in r.json()["errors"]]
    assert "1" in fields and "2.amount" in fields and "3.type" in fields
    assert "4.metadata" in fields and "5" in fields
    assert http.post("/api/events", headers=producer, json=[]).status_code == 422
    too_many = [{"type": "charge", "user_id": "ev2", "amount": 1}] * 1001
    r = http.post("/api/events", headers=producer, json=too_many)
    assert r.status_code == 422 and "1000" in r.json()["message"]
    r = http.post("/api/events", headers=producer,
                  json={"type": "charge", "user_id": "ev2", "amount": 1,
                        "metadata": {"bad": "nul\u0000"}})
    assert r.status_code == 422

    marker = http.post("/api/events", headers=producer,
                       json={"type": "charge", "user_id": "ev2", "amount": 1, "key": "mark"})
    assert poll_event(http, keys["reader"], marker.json()["data"]["keys"][0])["status"] == \
        "applied"
    time.sleep(0.5)
    never = http.get("/api/events/good-1", headers=auth(keys["reader"]))
    assert never.status_code == 404, never.text  # never published
    assert balance(http, keys["reader"], "ev2")["balance"] == 4


def test_events_for_unknown_accounts_are_dead_lettered(http: httpx.Client, keys: dict,
                                                       worker: Worker) -> None:
    r = http.post("/api/events", headers=auth(keys["producer"]),
                  json={"type": "charge", "user_id": "ghost", "amount": 1, "key": "dl-1"})
    assert r.status_code == 202
    outcome = poll_event(http, keys["reader"], "dl-1")
    assert outcome["status"] == "dead_lettered" and outcome["reason"] == "account not found"


# -- accounts ----------------------------------------------------------------------------------


def test_opening_an_account_is_idempotent(http: httpx.Client, keys: dict) -> None:
    producer = auth(keys["producer"])
    created = open_account(http, keys["producer"], "acc", plan="Gift",
                           timezone="Asia/Bangkok")
    assert (created["plan"], created["timezone"], created["balance"], created["created"]) == (
        "Gift", "Asia/Bangkok", 100, True)
    again = http.post("/api/accounts", json={"user_id": "acc"}, headers=producer)
    assert again.status_code == 200 and again.json()["data"]["created"] is False
    other = http.post("/api/accounts", json={"user_id": "acc", "plan": "Business"},
                      headers=producer)
    assert other.status_code == 409 and "Gift" in other.json()["message"]
    for body, field in (({"user_id": "x", "plan": "Platinum"}, "plan"),
                        ({"user_id": "x", "timezone": "Mars/Olympus"}, "timezone"),
                        ({"user_id": "x", "timezone": "../../etc/passwd"}, "timezone"),
                        ({"user_id": ""}, "user_id")):
        r = http.post("/api/accounts", json=body, headers=producer)
        assert r.status_code == 422, (body, r.text)
        assert r.json()["errors"][0]["field"] == field


# -- statistics and the monthly report (seeds 003, 004) ---------------------------------------


@pytest.fixture
def march(db: str) -> str:
    """A Gift account's March 2025: two charges, a refund, a credit and two LLM uses,
    then one charge in April."""
    t = datetime(2025, 3, 1, 12, tzinfo=UTC)
    apply(db, {"type": "open_account", "key": "o", "user_id": "st", "plan": "Gift"}, now=t)
    apply(db, {"type": "charge", "key": "c1", "user_id": "st", "feature": "image_generation"},
          now=t + timedelta(days=1))
    apply(db, {"type": "charge", "key": "c2", "user_id": "st", "feature": "chatgpt_message"},
          now=t + timedelta(days=2))
    apply(db, {"type": "refund", "key": "r1", "user_id": "st", "original_key": "c1",
               "amount": 5, "reason": "operation_failed"}, now=t + timedelta(days=3))
    apply(db, {"type": "credit", "key": "p1", "user_id": "st", "amount": 50,
               "wallet_type": "PREMIUM"}, now=t + timedelta(days=4))
    apply(db, {"type": "token_process_end", "key": "e1", "user_id": "st",
               "feature_endpoint_id": "text_generation", "input_tokens": 1000,
               "output_tokens": 2000, "model": "gemini-pro"}, now=t + timedelta(days=5))
    apply(db, {"type": "token_process_end", "key": "e2", "user_id": "st",
               "feature_endpoint_id": "code_generation", "input_tokens": 500,
               "output_tokens": 1000, "model": "gpt-4o"}, now=t + timedelta(days=6))
    apply(db, {"type": "charge", "key": "c3", "user_id": "st", "feature": "chatgpt_message"},
          now=datetime(2025, 4, 2, tzinfo=UTC))
    return db


def test_statistics_for_a_period(http: httpx.Client, keys: dict, march: str) -> None:
    r = http.get("/api/accounts/st/statistics", headers=auth(keys["reader"]),
                 params={"start": "2025-03-01T00:00:00Z", "end": "2025-04-01T00:00:00Z",
                         "credit_value": "0.01"})
    assert r.status_code == 200, r.text
    s = r.json()["data"]
    # Spent: 10 + 5 + 11 (gemini: ceil(9000/1000 × 1.2)) + 12 (gpt-4o: ceil(4500/500 × 1.3))
    assert s["totalSpent"] == 38
    assert s["totalRefunded"] == 5 and s["netSpent"] == 33
    assert s["totalEarned"] == 150  # 100 opening + 50 credit
    assert s["netChange"] == 150 - 38 + 5
    assert s["operationCount"] == 7
    assert s["byFeature"]["image_generation"] == {
        "operations": 1, "spent": 10, "refunded": 5, "netSpent": 5}
    assert s["byFeature"]["chatgpt_message"]["spent"] == 5
    gemini = s["byModel"]["gemini-pro"]
    assert (gemini["operations"], gemini["inputTokens"], gemini["outputTokens"],
            gemini["creditsCharged"]) == (1, 1000, 2000, 11)
    assert gemini["exactCost"] == pytest.approx(10.8)
    assert gemini["baseCredits"] == pytest.approx(9.0)
    assert gemini["marginCredits"] == pytest.approx(2.0)
    assert gemini["providerCost"] == pytest.approx(0.000875)  # 1 × 0.000125 + 2 × 0.000375
    gpt = s["byModel"]["gpt-4o"]
    assert gpt["creditsCharged"] == 12 and gpt["providerCost"] == pytest.approx(0.01125)
    margin = s["margin"]
    assert margin["creditsCharged"] == 23
    assert margin["baseCredits"] == pytest.approx(18.0)
    assert margin["marginCredits"] == pytest.approx(5.0)
    assert margin["marginPercent"] == pytest.approx(21.74)
    assert margin["providerCost"] == pytest.approx(0.012125)
    assert margin["revenue"] == pytest.approx(0.23)
    assert margin["marginValue"] == pytest.approx(0.23 - 0.012125)

    whole = http.get("/api/accounts/st/statistics", headers=auth(keys["reader"])).json()["data"]
    assert whole["totalSpent"] == 43 and whole["netChange"] == 150 - 43 + 5
    assert whole["margin"]["creditValue"] is None

    for params, field in (({"start": "2025-04-01", "end": "2025-03-01"}, "end"),
                          ({"credit_value": "-1"}, "credit_value"),
                          ({"start": "0001-01-01T00:00:00+14:00"}, "start")):
        r = http.get("/api/accounts/st/statistics", headers=auth(keys["reader"]),
                     params=params)
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == field, r.text
    assert http.get("/api/accounts/ghost/statistics",
                    headers=auth(keys["reader"])).status_code == 404


def test_monthly_report_balances_add_up(http: httpx.Client, keys: dict, march: str) -> None:
    reader = auth(keys["reader"])
    m = http.get("/api/accounts/st/reports/monthly", params={"month": "2025-03"},
                 headers=reader).json()["data"]
    assert m["month"] == "2025-03"
    assert m["period"] == {"start": "2025-03-01T00:00:00Z", "end": "2025-04-01T00:00:00Z",
                           "timezone": "UTC"}
    assert m["openingBalance"] == 0 and m["closingBalance"] == 117
    assert m["closingBalance"] == m["openingBalance"] + m["summary"]["netChange"]
    assert m["summary"]["totalSpent"] == 38 and m["summary"]["operationCount"] == 7
    assert m["breakdown"]["image_generation"]["spent"] == 10
    assert m["daily"]["2025-03-02"] == {"spent": 10, "refunded": 0}
    assert m["daily"]["2025-03-04"] == {"spent": 0, "refunded": 5}
    april = http.get("/api/accounts/st/reports/monthly", params={"month": "2025-04"},
                     headers=reader).json()["data"]
    assert (april["openingBalance"], april["closingBalance"]) == (117, 112)
    assert april["summary"]["netChange"] == -5
    for month in ("2025-13", "25-03", "1900-01", "March"):
        r = http.get("/api/accounts/st/reports/monthly", params={"month": month},
                     headers=reader)
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == "month"


def test_monthly_report_uses_the_accounts_timezone(http: httpx.Client, keys: dict,
                                                   db: str) -> None:
    """A charge at 20:00 UTC on 31 March is 03:00 on 1 April in Bangkok: April's."""
    t = datetime(2025, 3, 10, tzinfo=UTC)
    apply(db, {"type": "open_account", "key": "o", "user_id": "bkk", "plan": "Gift",
               "timezone": "Asia/Bangkok"}, now=t)
    apply(db, {"type": "charge", "key": "late", "user_id": "bkk",
               "feature": "image_generation"}, now=datetime(2025, 3, 31, 20, tzinfo=UTC))
    reader = auth(keys["reader"])
    march = http.get("/api/accounts/bkk/reports/monthly", params={"month": "2025-03"},
                     headers=reader).json()["data"]
    april = http.get("/api/accounts/bkk/reports/monthly", params={"month": "2025-04"},
                     headers=reader).json()["data"]
    assert march["period"]["start"] == "2025-02-28T17:00:00Z"
    assert march["summary"]["totalSpent"] == 0 and april["summary"]["totalSpent"] == 10
    assert april["daily"] == {"2025-04-01": {"spent": 10, "refunded": 0}}
    assert (march["closingBalance"], april["openingBalance"], april["closingBalance"]) == (
        100, 100, 90)


# -- daily reset and renewals (admin) -----------------------------------------------------------


def test_daily_reset_status_and_run(http: httpx.Client, keys: dict, worker: Worker,
                                    db: str) -> None:
    """Given a Free account that spent 3 yesterday, the status shows it due, and a run
    resets it to 5 exactly once."""
    yesterday = datetime.now(UTC) - timedelta(days=1, hours=1)
    apply(db, {"type": "open_account", "key": "o", "user_id": "dr"}, now=yesterday)
    apply(db, {"type": "charge", "key": "c", "user_id": "dr", "amount": 3}, now=yesterday)
    admin = auth(keys["admin"])
    status = http.get("/api/billing/daily-reset", headers=admin).json()["data"]
    assert status["dueAccounts"] == 1 and status["needsReset"] is True

    r = http.post("/api/billing/daily-reset", headers=admin, params={"wait": 30})
    assert r.status_code == 200, r.text
    run = r.json()["data"]
    assert run["kind"] == "daily" and run["status"] == "completed"
    assert (run["total_processed"], run["successful"], run["failed"]) == (1, 1, 0)
    assert balance(http, keys["reader"], "dr")["balance"] == 5
    assert http.get("/api/billing/daily-reset", headers=admin).json()["data"][
        "dueAccounts"] == 0
    again = http.post("/api/billing/daily-reset", headers=admin, params={"wait": 30})
    assert again.json()["data"]["total_processed"] == 0
    assert balance(http, keys["reader"], "dr")["balance"] == 5

    runs = http.get("/api/renewals/runs", headers=admin, params={"kind": "daily"})
    assert [x["id"] for x in runs.json()["data"]] == [again.json()["data"]["id"], run["id"]]
    one = http.get(f"/api/renewals/runs/{run['id']}", headers=admin).json()["data"]
    assert one["successful"] == 1
    missing = http.get("/api/renewals/runs/999999", headers=admin)
    assert missing.status_code == 404 and missing.json()["success"] is False
    assert_verified(db)


def test_renewal_dry_run_reports_what_would_change(http: httpx.Client, keys: dict,
                                                   worker: Worker, db: str) -> None:
    long_ago = datetime.now(UTC) - timedelta(days=31)
    apply(db, {"type": "open_account", "key": "o", "user_id": "gift", "plan": "Gift"},
          now=long_ago)
    apply(db, {"type": "charge", "key": "c", "user_id": "gift", "amount": 40}, now=long_ago)
    admin = auth(keys["admin"])
    r = http.post("/api/renewals/run", headers=admin, params={"wait": 30},
                  json={"kind": "monthly", "tier": "Gift", "dry_run": True})
    assert r.status_code == 200, r.text
    run = r.json()["data"]
    assert run["dryRun"] is True and run["successful"] == 1  # docs/api.md: camelCase
    assert run["changes"][0]["userId"] == "gift"
    assert run["changes"][0]["balanceAfter"] == 100
    assert balance(http, keys["reader"], "gift")["balance"] == 60  # nothing changed
    bad = http.post("/api/renewals/run", headers=admin,
                    json={"kind": "yearly", "limit": 0, "dry_run": "yes"})
    assert bad.status_code == 422
    assert {e["field"] for e in bad.json()["errors"]} == {"kind", "limit", "dry_run"}


# -- health, metrics, documents and error envelopes ---------------------------------------


def test_health_readiness_and_metrics(http: httpx.Client, settings: Settings,
                                      monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    assert http.get("/healthz").json() == {"success": True, "data": {"status": "ok"}}
    ready = http.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["data"] == {"database": "ok", "broker": "ok"}
    metrics = http.get("/metrics")
    assert metrics.status_code == 200 and "text/plain" in metrics.headers["content-type"]
    assert "python_info" in metrics.text or "process_" in metrics.text
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    multi = http.get("/metrics")
    assert multi.status_code == 200 and "python_info" not in multi.text


def test_readiness_is_503_when_the_broker_or_database_is_down(settings: Settings) -> None:
    broken = settings.model_copy(update={
        "broker_url": "redis://127.0.0.1:1/0",
        "database_url": "postgresql+psycopg://postgres@127.0.0.1:1/nowhere"})
    server = ServerThread(broken).start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            assert c.get("/healthz").status_code == 200
            r = c.get("/readyz")
            assert r.status_code == 503
            body = r.json()
            assert body["success"] is False and body["status"] == 503
            assert body["data"]["broker"].startswith("unavailable")
            assert body["data"]["database"].startswith("unavailable")
            # An API call while the database is down is a clean 503, not a 500.
            r = c.get("/api/billing/balance", params={"user_id": "u"},
                      headers={"x-server-api-key": "tl_aaaaaaaaaaaa_" + "a" * 43})
            assert r.status_code == 503 and r.json()["success"] is False
    finally:
        server.stop()


def test_publishing_while_the_broker_is_down_is_a_clean_503(settings: Settings, keys: dict,
                                                           db: str) -> None:
    down = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    server = ServerThread(down).start()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            r = c.post("/api/events", headers=auth(keys["producer"]),
                       json={"type": "charge", "user_id": "u", "amount": 1})
            assert r.status_code == 503, r.text
            assert r.json()["success"] is False and "broker" in r.json()["message"]
    finally:
        server.stop()


def test_user_ids_and_keys_with_slashes_reach_their_routes(http: httpx.Client, keys: dict,
                                                         worker: Worker) -> None:
    open_account(http, keys["producer"], "team/alice")
    r = http.get("/api/accounts/team/alice/statistics", headers=auth(keys["reader"]))
    assert r.status_code == 200 and r.json()["data"]["userId"] == "team/alice"
    r = http.get("/api/accounts/team%2Falice/reports/monthly", headers=auth(keys["reader"]))
    assert r.status_code == 200 and r.json()["data"]["userId"] == "team/alice"
    http.post("/api/events", headers=auth(keys["producer"]),
              json={"type": "charge", "user_id": "team/alice", "amount": 1, "key": "a/b/c"})
    assert poll_event(http, keys["reader"], "a/b/c")["status"] == "applied"


def test_openapi_documents_every_route(http: httpx.Client) -> None:
    assert "swagger" in http.get("/docs").text.lower()
    schema = http.get("/openapi.json").json()
    paths = schema["paths"]
    for path, method in (("/api/billing/balance", "get"), ("/api/billing/transactions", "get"),
                         ("/api/billing/wallets", "get"), ("/api/billing/wallets", "post"),
                         ("/api/billing/daily-reset", "get"),
                         ("/api/billing/daily-reset", "post"),
                         ("/api/token-process/start", "post"),
                         ("/api/token-process/end", "post"), ("/api/events", "post"),
                         ("/api/events/{key}", "get"), ("/api/accounts", "post"),
                         ("/api/accounts/{user_id}/statistics", "get"),
                         ("/api/accounts/{user_id}/reports/monthly", "get"),
                         ("/api/billing/can-afford", "get"), ("/api/renewals/run", "post"),
                         ("/api/renewals/runs", "get"), ("/healthz", "get"),
                         ("/readyz", "get"), ("/metrics", "get")):
        assert method in paths[path], (path, method)
    assert schema["components"]["securitySchemes"]["APIKeyHeader"]["name"] == \
        "x-server-api-key"
    assert "Charge" in schema["components"]["schemas"]


def test_errors_are_envelopes_and_bodies_are_bounded(http: httpx.Client, keys: dict) -> None:
    r = http.get("/api/nothing-here", headers=auth(keys["admin"]))
    assert r.status_code == 404 and r.json() == {"success": False, "status": 404,
                                                 "message": "Not Found"}
    r = http.delete("/api/billing/balance", headers=auth(keys["admin"]))
    assert r.status_code == 405 and r.json()["status"] == 405
    big = b'{"user_id": "' + b"x" * (25 * 1024 * 1024) + b'"}'
    r = http.post("/api/token-process/start", headers=auth(keys["producer"]), content=big)
    assert r.status_code == 413 and r.json()["status"] == 413


def test_the_api_keeps_the_ledger_verified(db: str, keys: dict, http: httpx.Client,
                                          worker: Worker) -> None:
    """Many starts and ends through HTTP leave every wallet equal to its entries."""
    producer = auth(keys["producer"])
    open_account(http, keys["producer"], "many", plan="Professional")
    holds = []
    for _ in range(10):
        data = http.post("/api/token-process/start", headers=producer, json={
            "user_id": "many", "feature_endpoint_id": "code_generation",
            "max_output_tokens": 1000}).json()["data"]
        assert data["status"] == "accessible"
        holds.append(data["hold_id"])
    for i, hold in enumerate(holds):
        r = http.post("/api/token-process/end", headers=producer, json={
            "user_id": "many", "feature_endpoint_id": "code_generation",
            "input_token": 100 * i, "output_token": 50 * i, "hold_id": hold})
        assert r.status_code == 200, r.text
    with session_scope(db) as session:
        open_holds = session.execute(text("SELECT count(*) FROM holds WHERE status = 'open'"))
        assert open_holds.scalar() == 0
    assert_verified(db)
