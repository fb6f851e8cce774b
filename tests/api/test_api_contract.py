"""What the API tells its callers beyond the seed shapes: a valid /metrics exposition, /docs
that works offline, summaries that name each route's scope, clear errors for bad bodies,
unknown event keys, the conflicts route, and expired holds that stop counting at once."""

from __future__ import annotations

import re
import subprocess
import time
import zipfile
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from tests.api.support import ServerThread, api_server, auth, http, keys
from tests.support import Worker, apply, assert_verified, session_scope
from tokenledger import LedgerClient, Settings
from tokenledger.queue.names import RENEW_BATCH
from tokenledger.queue.producer import Producer
from tokenledger.renewals import runs
from tokenledger.renewals.service import RunOptions

pytestmark = pytest.mark.services
__all__ = ["api_server", "http", "keys"]  # fixtures used by name
ROOT = Path(__file__).resolve().parents[2]


def _open(http: httpx.Client, key: str, user_id: str, **fields: str) -> None:
    r = http.post("/api/accounts", json={"user_id": user_id, **fields}, headers=auth(key))
    assert r.status_code == 201, r.text


def _wait_run(settings: Settings, trigger: str, timeout: float = 60) -> None:
    """Wait until a run with ``trigger`` is sealed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with session_scope(settings) as session:
            if session.scalar(text("SELECT count(*) FROM renewal_runs WHERE trigger = :t "
                                   "AND finished_at IS NOT NULL"), {"t": trigger}):
                return
        time.sleep(0.1)
    raise AssertionError(f"no {trigger} run finished")


# -- /metrics ---------------------------------------------------------------------------------


def test_metrics_is_a_valid_exposition_after_charges_starts_and_renewals(
        http: httpx.Client, keys: dict, worker: Worker, db: Settings) -> None:
    """Each family name appears once, whichever process counted what."""
    long_ago = datetime.now(UTC) - timedelta(days=31)
    apply(db, {"type": "open_account", "key": "o", "user_id": "gift", "plan": "Gift"},
          now=long_ago)
    producer, admin = auth(keys["producer"]), auth(keys["admin"])
    _open(http, keys["producer"], "m1", plan="Professional")
    for i in range(3):
        r = http.post("/api/events", headers=producer,
                      json={"type": "charge", "user_id": "m1", "amount": 1, "key": f"m{i}"})
        assert r.status_code == 202, r.text
        r = http.post("/api/token-process/start", headers=producer, json={
            "user_id": "m1", "feature_endpoint_id": "code_generation"})
        assert r.json()["data"]["status"] == "accessible", r.text
    # Beat's path: the renew_batch task by name, taken by the worker ...
    beat = Producer(db)
    try:
        beat.send(RENEW_BATCH, kwargs={"kind": "monthly", "trigger": "beat"})
    finally:
        beat.close()
    _wait_run(db, "beat")
    # ... the same run finished in this (the API's) process, and one from the API.
    run_id, chunks = runs.start_run(db, RunOptions(kind="daily", trigger="cli"))
    runs.execute_inline(db, chunks)
    r = http.post("/api/renewals/run", headers=admin, params={"wait": 30},
                  json={"kind": "monthly"})
    assert r.status_code == 200, r.text

    exposition = http.get("/metrics").text
    names = Counter(f.name for f in text_string_to_metric_families(exposition))
    assert [n for n, count in names.items() if count > 1] == []
    assert "tokenledger_renewal_runs_recorded" in names


# -- /docs --------------------------------------------------------------------------------------


def test_docs_load_swagger_from_the_package_not_a_cdn(http: httpx.Client) -> None:
    page = http.get("/docs")
    assert page.status_code == 200 and "SwaggerUIBundle" in page.text
    assert re.findall(r"https?://[^\s\"']+", page.text) == []
    assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", page.text)
    assert {"/docs/static/swagger-ui-bundle.js", "/docs/static/swagger-ui.css"} <= set(assets)
    for asset in assets:
        r = http.get(asset)
        assert r.status_code == 200 and r.content, asset
    assert http.get("/redoc").status_code == 404


def test_the_wheel_ships_the_swagger_assets(tmp_path) -> None:
    wheel_dir = tmp_path / "dist"
    subprocess.run(["uv", "build", "--wheel", "--out-dir", str(wheel_dir), "--quiet"],
                   cwd=ROOT, check=True, timeout=300)
    (wheel,) = wheel_dir.glob("tokenledger-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png"):
        assert f"tokenledger/api/static/{asset}" in names


# -- summaries --------------------------------------------------------------------------------


def test_every_operation_says_what_it_does_and_which_scope_it_needs(http: httpx.Client) -> None:
    schema = http.get("/openapi.json").json()
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            summary = operation.get("summary", "")
            assert not re.search(r"seed \d", summary, re.I), (method, path, summary)
            scopes = operation["x-scopes"]
            if path.startswith("/api/"):
                assert scopes and scopes[-1] == "admin", (method, path)
                assert summary.endswith(f"(scope: {' or '.join(scopes)})"), (method, path)
            else:
                assert scopes == [] and summary.endswith("(public, no key)"), (method, path)
    paths = schema["paths"]
    assert paths["/api/token-process/start"]["post"]["x-scopes"] == ["producer", "admin"]
    assert paths["/api/billing/balance"]["get"]["x-scopes"] == ["reader", "admin"]
    assert paths["/api/renewals/run"]["post"]["x-scopes"] == ["admin"]


# -- malformed bodies -------------------------------------------------------------------------

BODY_ROUTES = ("/api/accounts", "/api/events", "/api/token-process/start",
               "/api/token-process/end", "/api/billing/wallets")


@pytest.mark.parametrize("path", BODY_ROUTES)
def test_a_body_that_is_not_json_is_named_as_such(http: httpx.Client, keys: dict,
                                                  path: str) -> None:
    headers = auth(keys["admin"], **{"content-type": "application/json"})
    for body, words in ((b"not json", "not valid JSON (Expecting value at character 0)"),
                        (b'{"user_id": "u"', "not valid JSON (Expecting ',' delimiter")):
        r = http.post(path, content=body, headers=headers)
        assert r.status_code == 422, r.text
        (error,) = r.json()["errors"]
        assert error["field"] == "body" and words in error["message"], r.text
        assert r.json()["message"].startswith("Invalid request: body: the request body is "
                                              "not valid JSON")
    for body in (b"", b"[1]", b'"text"'):
        r = http.post(path, content=body, headers=headers)
        assert r.status_code == 422, r.text
        if path != "/api/events" or body != b"[1]":
            assert r.json()["errors"][0]["field"] == "body", r.text
            assert "the request body " in r.json()["message"], r.text


def test_validation_errors_name_each_field(http: httpx.Client, keys: dict) -> None:
    headers = auth(keys["admin"])
    r = http.post("/api/token-process/start", headers=headers,
                  json={"user_id": 5, "max_output_tokens": -1})
    fields = {e["field"] for e in r.json()["errors"]}
    assert r.status_code == 422 and {"user_id", "feature_endpoint_id"} <= fields, r.text
    r = http.post("/api/events", headers=headers, json={"user_id": "u", "amount": 1})
    (error,) = r.json()["errors"]
    assert error["field"] == "type" and "charge" in error["message"], r.text
    r = http.post("/api/events", headers=headers,
                  json=[{"type": "charge", "user_id": "u", "amount": 1}, {"type": "charge"}])
    assert {e["field"] for e in r.json()["errors"]} == {"1.user_id"}, r.text


# -- events: unknown keys and conflicts -----------------------------------------------------


def test_an_event_key_never_published_is_404_one_in_flight_is_pending(
        settings: Settings, keys: dict, http: httpx.Client, db: Settings) -> None:
    reader = auth(keys["reader"])
    r = http.get("/api/events/never-published", headers=reader)
    assert r.status_code == 404, r.text
    assert r.json()["success"] is False and "never published" in r.json()["message"]
    # A queue no worker takes: what the API accepts stays in flight.
    idle = settings.model_copy(update={"queue": f"{settings.queue}-idle"})
    server = ServerThread(idle).start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            r = c.post("/api/events", headers=auth(keys["producer"]),
                       json={"type": "charge", "user_id": "u", "amount": 1, "key": "on-way"})
            assert r.status_code == 202, r.text
            r = c.get("/api/events/on-way", headers=reader)
            assert r.status_code == 200 and r.json()["data"]["status"] == "pending", r.text
    finally:
        server.stop()
        purger = Producer(idle)
        purger.purge()
        purger.close()


def test_conflicts_are_listed_for_admins_newest_first_and_paged(
        http: httpx.Client, keys: dict, worker: Worker, db: Settings) -> None:
    producer = auth(keys["producer"])
    _open(http, keys["producer"], "cf")
    for amount in (1, 2, 3):
        r = http.post("/api/events", headers=producer, json={
            "type": "charge", "user_id": "cf", "amount": amount, "key": "cf-1"})
        assert r.status_code == 202
        if amount == 1:
            assert _outcome(http, keys["reader"], "cf-1")["status"] == "applied"
        else:  # one at a time, so the conflicts' order is the publishing order
            assert _wait_conflicts(http, keys["admin"], amount - 1)
    assert http.get("/api/conflicts", headers=auth(keys["reader"])).status_code == 403
    first = http.get("/api/conflicts", headers=auth(keys["admin"]), params={"limit": 1})
    assert first.status_code == 200, first.text
    data = first.json()["data"]
    assert data["total"] == 2 and len(data["conflicts"]) == 1
    newest = data["conflicts"][0]
    assert newest["key"] == "cf-1" and newest["payload"]["amount"] == 3
    assert newest["stored"]["outcome"] == "applied" and "seenAt" in newest
    older = http.get("/api/conflicts", headers=auth(keys["admin"]),
                     params={"before": data["nextBefore"]}).json()["data"]
    assert [c["payload"]["amount"] for c in older["conflicts"]] == [2]
    assert older["nextBefore"] is None


def _outcome(http: httpx.Client, key: str, event_key: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        r = http.get(f"/api/events/{event_key}", headers=auth(key))
        data = r.json().get("data") or {}
        if data.get("status") not in (None, "pending") or time.monotonic() > deadline:
            return data
        time.sleep(0.05)


def _wait_conflicts(http: httpx.Client, key: str, count: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = http.get("/api/conflicts", headers=auth(key))
        if r.status_code == 200 and r.json()["data"]["total"] >= count:
            return True
        time.sleep(0.1)
    return False


# -- expired holds stop counting at once ---------------------------------------------------


def test_an_expired_hold_stops_counting_for_the_next_start_api_and_sdk(
        settings: Settings, keys: dict, db: Settings) -> None:
    """No sweep runs here: the start itself releases the account's expired holds."""
    short = settings.model_copy(update={"hold_ttl_seconds": 1})
    apply(db, {"type": "open_account", "key": "o-api", "user_id": "exp-api"},
          {"type": "open_account", "key": "o-sdk", "user_id": "exp-sdk"})
    start = {"feature_endpoint_id": "text_generation", "hold": 5}
    server = ServerThread(short).start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            producer = auth(keys["producer"])
            first = c.post("/api/token-process/start", headers=producer,
                           json={"user_id": "exp-api", **start}).json()["data"]
            assert first["status"] == "accessible" and first["token"] == 0, first
            time.sleep(1.2)
            again = c.post("/api/token-process/start", headers=producer,
                           json={"user_id": "exp-api", **start}).json()["data"]
            assert again["status"] == "accessible" and again["token"] == 0, again
    finally:
        server.stop()
    with LedgerClient(short) as sdk:
        assert sdk.token_process_start("exp-sdk", **start).status == "accessible"
        time.sleep(1.2)
        assert sdk.token_process_start("exp-sdk", **start).status == "accessible"
    with session_scope(db) as session:
        statuses = session.execute(text(
            "SELECT user_id, status, count(*) FROM holds GROUP BY 1, 2 ORDER BY 1, 2")).all()
    assert [tuple(r) for r in statuses] == [("exp-api", "expired", 1), ("exp-api", "open", 1),
                                            ("exp-sdk", "expired", 1), ("exp-sdk", "open", 1)]
    assert_verified(db)


# -- the naming convention and docs/api.md ----------------------------------------------------

SNAKE = re.compile(r"^[a-z][a-z0-9_]*$")
CAMEL = re.compile(r"^[a-z][a-zA-Z0-9]*$")
SEGMENT = re.compile(r"^([a-z0-9]+(-[a-z0-9]+)*|\{[a-z][a-z0-9_]*\})$")


def _names(schema: dict, node: dict, seen: set[str] | None = None) -> set[str]:
    """Every property name a schema node declares, following references and unions."""
    seen = set() if seen is None else seen
    ref = node.get("$ref")
    if ref:
        if ref in seen:
            return set()
        seen.add(ref)
        node = schema["components"]["schemas"][ref.rsplit("/", 1)[1]]
    names = set(node.get("properties", {}))
    children = [*node.get("properties", {}).values(), *node.get("anyOf", ()),
                *node.get("oneOf", ()), *node.get("allOf", ())]
    if isinstance(node.get("items"), dict):
        children.append(node["items"])
    for child in children:
        names |= _names(schema, child, seen)
    return names


def test_routes_the_seeds_do_not_define_follow_one_naming_convention(
        http: httpx.Client) -> None:
    from tokenledger.api.docs import SEED_ROUTES

    schema = http.get("/openapi.json").json()
    checked = 0
    for path, operations in schema["paths"].items():
        for method, op in operations.items():
            if (method.upper(), path) in SEED_ROUTES or not path.startswith("/api/"):
                continue
            checked += 1
            where = f"{method.upper()} {path}"
            assert all(SEGMENT.match(s) for s in path.split("/")[1:]), where
            assert all(SNAKE.match(p["name"]) for p in op.get("parameters", ())
                       if p["in"] in ("path", "query")), where
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {})
            bad = {n for n in _names(schema, body.get("schema", {})) if not SNAKE.match(n)}
            assert not bad, (where, bad)
            for status, answer in op["responses"].items():
                if not status.startswith("2"):
                    continue
                envelope = answer.get("content", {}).get("application/json", {})
                data = _names(schema, envelope.get("schema", {})) - {"success", "message"}
                bad = {n for n in data if not CAMEL.match(n)}
                assert not bad, (where, status, bad)
    assert checked >= 12


def test_renewal_runs_answer_in_the_conventions_names(http: httpx.Client, keys: dict,
                                                      worker: Worker) -> None:
    admin = auth(keys["admin"])
    run = http.post("/api/renewals/run", headers=admin, params={"wait": 30},
                    json={"kind": "monthly", "dry_run": True}).json()["data"]
    listed = http.get("/api/renewals/runs", headers=admin).json()["data"][0]
    one = http.get(f"/api/renewals/runs/{run['id']}", headers=admin).json()["data"]
    for data in (run, listed, one):
        assert {"dryRun", "totalProcessed", "continueOnError"} <= set(data), data
        assert all(CAMEL.match(k) for k in data), data


def test_docs_api_md_lists_every_route_as_the_openapi_document_does(
        http: httpx.Client) -> None:
    from tokenledger.api.docs import BEGIN_TABLE, END_TABLE, route_table

    document = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    table = document.partition(BEGIN_TABLE)[2].partition(END_TABLE)[0].strip()
    assert table == route_table(http.get("/openapi.json").json()), \
        "docs/api.md is stale: run `uv run python -m tokenledger.api.docs docs/api.md`"
