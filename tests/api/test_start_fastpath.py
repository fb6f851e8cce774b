"""The token-process start's fast path (``api.tokenprocess.StartFastPath``) and its start
pool (``tokenprocess.pool``).

The fast path answers ordinary starts itself and hands every other request to FastAPI
with the body intact, so unusual requests get the route's own answers. Starts through it
are the same transaction as the route's: concurrent starts on one account never
overspend, a revoked key stops working within the key cache's time, and a start
connection the server dropped is replaced without the caller noticing.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import httpx
import psycopg
import pytest
from sqlalchemy import select, text

from tests.api.support import KEY_CACHE_SECONDS, ServerThread, api_server, auth, http, keys
from tests.support import apply, assert_verified, session_scope
from tokenledger import Settings
from tokenledger.api import create_app
from tokenledger.api.tokenprocess import START_PATH as PATH
from tokenledger.api.tokenprocess import StartFastPath
from tokenledger.apikeys.service import create_key, revoke_key
from tokenledger.db.pipeline import BEGIN, COMMIT, ROLLBACK, ConnectionLost, PipeConnection
from tokenledger.db.sql import load, pyformat
from tokenledger.messages import StartRequest
from tokenledger.notify import publisher
from tokenledger.notify import service as notify
from tokenledger.ops.metrics import START_GROUP_SIZE
from tokenledger.tokenprocess import service as start_service
from tokenledger.tokenprocess.models import Hold
from tokenledger.tokenprocess.pool import APPLICATION_NAME, StartPool

WRITE = load("tokenledger.tokenprocess", "write_holds")
LOCK_WALLETS = load("tokenledger.tokenprocess", "lock_wallets")


def req(user_id: str, feature: str, **fields: Any) -> StartRequest:
    return StartRequest(user_id=user_id, feature_endpoint_id=feature, **fields)

pytestmark = pytest.mark.services
__all__ = ["api_server", "http", "keys"]  # fixtures used by name


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def open_accounts(db: Settings, *users: str) -> None:
    for user in users:
        apply(db, {"type": "open_account", "key": f"open:{user}", "user_id": user})


# -- the middleware on its own, in front of a recorder ----------------------------------------


class Recorder:
    """The app behind the fast path: records what reached it and answers 299."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]],
                       send: Callable[[dict], Awaitable[None]]) -> None:
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        self.bodies.append(body)
        await send({"type": "http.response.start", "status": 299, "headers": []})
        await send({"type": "http.response.body", "body": b""})


async def call(app: Any, asgi: Any, body: bytes, headers: list[tuple[bytes, bytes]],
               method: str = "POST", path: str = PATH, chunks: int = 1) -> tuple[int, bytes]:
    """One request through ``asgi`` (whose state is ``app``'s); (status, body)."""
    size = max(1, -(-len(body) // chunks))
    parts = [body[i:i + size] for i in range(0, len(body), size)] or [b""]
    messages = [{"type": "http.request", "body": part, "more_body": i < len(parts) - 1}
                for i, part in enumerate(parts)]
    sent: list[dict] = []

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": method, "path": path, "raw_path": path.encode(), "root_path": "",
             "scheme": "http", "query_string": b"", "headers": headers,
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "app": app}
    await asgi(scope, receive, send)
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


def start_headers(key: str, body: bytes, **extra: str) -> list[tuple[bytes, bytes]]:
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode()),
               (b"x-server-api-key", key.encode())]
    return headers + [(k.encode(), v.encode()) for k, v in extra.items()]


def test_the_fast_path_answers_ordinary_starts_and_passes_everything_else_on_intact(
        settings: Settings, db: Settings) -> None:
    user = uid("fast")
    apply(db, {"type": "open_account", "key": f"open:{user}", "user_id": user})
    with session_scope(db) as session:
        producer = create_key(session, "producer", "fast").key
        reader = create_key(session, "reader", "fast").key
        unknown = create_key(session, "producer", "never used").key
    ordinary = json.dumps({"user_id": user, "feature_endpoint_id": "text_generation"}).encode()
    unusual: list[tuple[str, bytes, list[tuple[bytes, bytes]]]] = [
        ("a key never looked up", ordinary, start_headers(unknown, ordinary)),
        ("a reader's key", ordinary, start_headers(reader, ordinary)),
        ("no key", ordinary, start_headers(producer, ordinary)[:2]),
        ("two keys", ordinary,
         start_headers(producer, ordinary) + [(b"x-server-api-key", producer.encode())]),
        ("another content type", ordinary,
         [(b"content-type", b"text/plain")] + start_headers(producer, ordinary)[1:]),
        ("no length", ordinary,
         start_headers(producer, ordinary)[:1] + start_headers(producer, ordinary)[2:]),
        ("broken JSON", b'{"user_id": ', start_headers(producer, b'{"user_id": ')),
        ("not an object", b"[]", start_headers(producer, b"[]")),
    ]
    for body in (b'{"user_id": "", "feature_endpoint_id": "text_generation"}',
                 b'{"user_id": "u", "feature_endpoint_id": "x", "surprise": 1}',
                 b'{"user_id": "u", "feature_endpoint_id": "x", "hold": -1}',
                 b'{"user_id": "u\\u0000", "feature_endpoint_id": "x"}',
                 b'{"user_id": "u", "feature_endpoint_id": "x", "hold": 1.0}'):
        unusual.append((f"invalid {body!r}", body, start_headers(producer, body)))
    unusual.append(("an invalid idempotency key", ordinary,
                    start_headers(producer, ordinary, **{"idempotency-key": "k" * 256})))

    async def scenario(app: Any) -> None:
        # The route's dependency looks the key up once and caches it.
        status, body = await call(app, app, ordinary, start_headers(producer, ordinary))
        assert status == 200 and json.loads(body)["data"]["status"] == "accessible"
        recorder = Recorder()
        fast = StartFastPath(app, recorder)
        status, body = await call(app, fast, ordinary, start_headers(producer, ordinary),
                                  chunks=3)
        assert status == 200 and recorder.bodies == [], body
        data = json.loads(body)["data"]
        assert (data["status"], data["token"], data["cost"]) == ("accessible", 3, 1)
        for what, raw, headers in unusual:
            recorder.bodies.clear()
            status, _ = await call(app, fast, raw, headers)
            assert (status, recorder.bodies) == (299, [raw]), what
        # The app hands it the start's route only.
        recorder.bodies.clear()
        app.fast_start = fast
        assert (await call(app, app, b"", [], method="GET", path="/healthz"))[0] == 200
        assert (await call(app, app, ordinary, start_headers(producer, ordinary),
                           method="PUT"))[0] == 405
        assert recorder.bodies == []
        assert (await call(app, app, ordinary, start_headers(unknown, ordinary)))[0] == 299
        assert recorder.bodies == [ordinary]

    run_app(settings, scenario)
    with session_scope(db) as session:
        assert len(session.scalars(select(Hold.id).where(Hold.user_id == user)).all()) == 2
    assert_verified(db)


def test_errors_on_the_fast_path_are_the_routes_envelopes(settings: Settings, db: Settings) -> None:
    user = uid("errors")
    apply(db, {"type": "open_account", "key": f"open:{user}", "user_id": user})
    with session_scope(db) as session:
        producer = create_key(session, "producer", "errors").key
    first = json.dumps({"user_id": user, "feature_endpoint_id": "project_creation"}).encode()
    other = json.dumps({"user_id": user, "feature_endpoint_id": "chatgpt_message"}).encode()
    ghost = json.dumps({"user_id": "ghost", "feature_endpoint_id": "chat"}).encode()

    async def scenario(app: Any) -> None:
        await call(app, app, first, start_headers(producer, first))  # caches the key
        fast = StartFastPath(app, Recorder())
        status, body = await call(app, fast, ghost, start_headers(producer, ghost))
        assert (status, json.loads(body)) == (404, {
            "success": False, "status": 404, "message": "Account not found: ghost"})
        headers = start_headers(producer, first, **{"idempotency-key": f"idem-{user}"})
        status, body = await call(app, fast, first, headers)
        assert status == 200
        again = await call(app, fast, first, headers)
        assert again == (200, body)
        headers = start_headers(producer, other, **{"idempotency-key": f"idem-{user}"})
        status, body = await call(app, fast, other, headers)
        assert status == 409 and json.loads(body)["status"] == 409

    run_app(settings, scenario)


def test_the_fast_path_answers_byte_for_byte_as_the_route(settings: Settings,
                                                          db: Settings) -> None:
    user = uid("bytes")
    apply(db, {"type": "open_account", "key": f"open:{user}", "user_id": user})
    with session_scope(db) as session:
        producer = create_key(session, "producer", "bytes").key
    body = json.dumps({"user_id": user, "feature_endpoint_id": "project_creation"}).encode()
    headers = start_headers(producer, body, **{"idempotency-key": f"bytes-{user}"})

    async def scenario(app: Any) -> None:
        recorder = Recorder()
        fast = StartFastPath(app, recorder)
        # A key the cache does not know: the route answers (and caches the key) ...
        route = await call(app, app, body, headers)
        assert recorder.bodies == []
        # ... then the fast path answers the retry, from the stored outcome.
        assert await call(app, fast, body, headers) == route
        assert recorder.bodies == []
        assert json.loads(route[1])["data"]["status"] == "accessible"

    run_app(settings, scenario)


def run_app(settings: Settings, scenario: Callable[[Any], Awaitable[None]]) -> None:
    """``scenario(app)`` with the app's lifespan (its state and start pool) running."""
    app = create_app(settings, key_cache_seconds=60)

    async def main() -> None:
        async with app.router.lifespan_context(app):
            await scenario(app)

    asyncio.run(main())


# -- over HTTP ------------------------------------------------------------------------------


def test_concurrent_starts_over_http_never_overspend(
        http: httpx.Client, keys: dict, api_server: ServerThread, db: Settings) -> None:
    """Given 5 credits, when 40 starts of 1 arrive at once over 8 connections, then
    exactly 5 hold a credit and 35 are refused for tokens."""
    user = uid("race")
    apply(db, {"type": "open_account", "key": f"open:{user}", "user_id": user})
    producer = auth(keys["producer"])
    body = {"user_id": user, "feature_endpoint_id": "project_creation"}
    # The first request (for nobody) caches the key; the starts then take the fast path.
    assert http.post(PATH, headers=producer, json={**body, "user_id": "nobody"}
                     ).status_code == 404

    def starts(_: int) -> list[dict]:
        with httpx.Client(base_url=api_server.url, timeout=60) as c:
            out = []
            for _ in range(5):
                r = c.post(PATH, headers=producer, json=body)
                assert r.status_code == 200, r.text
                out.append(r.json()["data"])
            return out

    with ThreadPoolExecutor(8) as pool:
        answers = [a for batch in pool.map(starts, range(8)) for a in batch]
    accessible = [a for a in answers if a["status"] == "accessible"]
    refused = [a for a in answers if a["status"] == "not-accessible"]
    assert len(accessible) == 5 and len(refused) == 35
    assert all(a["message"] == "Insufficient tokens" for a in refused)
    assert len({a["hold_id"] for a in accessible}) == 5
    assert sorted(a["token"] for a in accessible) == [0, 1, 2, 3, 4]
    with session_scope(db) as session:
        held = session.scalar(text("SELECT sum(amount) FROM holds WHERE user_id = :u"),
                              {"u": user})
    assert held == 5
    assert_verified(db)


def test_a_revoked_key_stops_starting_within_the_cache_time(http: httpx.Client,
                                                           db: Settings) -> None:
    user = uid("revoked")
    apply(db, {"type": "open_account", "key": f"open:{user}", "user_id": user})
    with session_scope(db) as session:
        created = create_key(session, "producer", "to revoke")
    body = {"user_id": user, "feature_endpoint_id": "project_creation"}
    for _ in range(2):  # looked up, then from the cache
        assert http.post(PATH, headers=auth(created.key), json=body).status_code == 200
    with session_scope(db) as session:
        revoke_key(session, created.info.prefix)
    time.sleep(KEY_CACHE_SECONDS + 0.2)
    r = http.post(PATH, headers=auth(created.key), json=body)
    assert r.status_code == 401 and r.json() == {
        "success": False, "status": 401, "message": "Invalid server API key"}


def test_invalid_starts_get_the_same_422_with_a_cached_key_as_without(
        http: httpx.Client, keys: dict, db: Settings) -> None:
    apply(db, {"type": "open_account", "key": "open:v", "user_id": "v"})
    cached = auth(keys["producer"])
    assert http.post(PATH, headers=cached, json={
        "user_id": "v", "feature_endpoint_id": "project_creation"}).status_code == 200
    for body in ({"user_id": "", "feature_endpoint_id": "chat"},
                 {"user_id": "v", "feature_endpoint_id": "chat", "max_output_tokens": -1},
                 {"user_id": "v", "feature_endpoint_id": "chat", "surprise": 1}):
        with session_scope(db) as session:
            fresh = auth(create_key(session, "producer", "fresh").key)
        warm = http.post(PATH, headers=cached, json=body)
        cold = http.post(PATH, headers=fresh, json=body)
        assert warm.status_code == cold.status_code == 422
        assert warm.content == cold.content


def test_a_start_connection_the_server_dropped_is_replaced(http: httpx.Client, keys: dict,
                                                          db: Settings) -> None:
    user = uid("dropped")
    apply(db, {"type": "open_account", "key": f"open:{user}", "user_id": user})
    producer = auth(keys["producer"])
    body = {"user_id": user, "feature_endpoint_id": "project_creation"}
    assert http.post(PATH, headers=producer, json=body).status_code == 200
    with session_scope(db) as session:
        killed = session.scalar(text(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE application_name = :name AND datname = current_database()"),
            {"name": APPLICATION_NAME})
    assert killed >= 1
    for expected in (3, 2, 1):
        r = http.post(PATH, headers=producer, json=body)
        assert r.status_code == 200, r.text
        assert r.json()["data"]["token"] == expected
    assert_verified(db)


def test_starts_over_http_publish_their_notices_after_the_commit(http: httpx.Client,
                                                                 keys: dict, db: Settings) -> None:
    """Given a Free account (5 credits, low at 1), when two starts hold 2 each over HTTP,
    then balance_changed 3 and 1 are published in order, and balance_low once at 1."""
    user = uid("notices")
    apply(db, {"type": "open_account", "key": f"open:{user}", "user_id": user})
    seen: list[notify.BalanceNotice] = []
    unsubscribe = notify.subscribe(lambda n: seen.append(n) if n.user_id == user else None)
    try:
        producer = auth(keys["producer"])
        for expected in (3, 1):
            r = http.post(PATH, headers=producer, json={
                "user_id": user, "feature_endpoint_id": "text_generation", "hold": 2})
            assert r.json()["data"]["token"] == expected, r.text
        deadline = time.monotonic() + 10
        while len(seen) < 3 and time.monotonic() < deadline:
            publisher.flush_published(1)
            time.sleep(0.01)
    finally:
        unsubscribe()
    assert [(n.event, n.balance) for n in seen] == [
        ("balance_changed", 3), ("balance_changed", 1), ("balance_low", 1)]
    assert seen[0].ledger_seq < seen[1].ledger_seq == seen[2].ledger_seq


# -- the start pool's groups ----------------------------------------------------------------


def group_sizes() -> tuple[float, float]:
    """(groups run, starts in them) so far in this process."""
    samples = {s.name: s.value for m in START_GROUP_SIZE.collect() for s in m.samples}
    return samples["tokenledger_start_group_size_count"], \
        samples["tokenledger_start_group_size_sum"]


def test_starts_arriving_together_run_in_groups_each_answered_as_if_alone(
        settings: Settings, db: Settings) -> None:
    """Given 12 Free accounts (5 credits, low at 1), when 3 starts holding 2 arrive for
    each at once, with a start for an unknown user, and one key used by two starts on
    another account with the same arguments and by one on a third with others: they run
    in groups (more starts than groups), and each account has exactly two holds (3 then
    1 left) and one refusal, balance_changed 3 and 1 and balance_low once; the unknown
    user's start fails alone; the key holds once, for whichever arguments came first,
    answering the same to the same arguments and a conflict to the others; the ledger
    verifies."""
    users = [uid("group") for _ in range(12)]
    same, other = uid("same"), uid("other")
    open_accounts(db, *users, same, other)
    key = f"twice-{uuid.uuid4().hex}"
    seen: list[notify.BalanceNotice] = []
    unsubscribe = notify.subscribe(lambda n: seen.append(n) if n.user_id in users else None)
    answers: dict[str, list[Any]] = {}
    before = group_sizes()

    async def scenario(app: Any) -> None:
        pool = app.state.api.start_pool
        calls = [(u, {"hold": 2}) for _ in range(3) for u in users]
        calls += [("nobody-" + uid("x"), {}), (same, {"key": key}), (same, {"key": key}),
                  (other, {"key": key, "hold": 3})]
        results = await asyncio.gather(
            *(pool.start(req(u, "text_generation", hold=kw.get("hold")), kw.get("key"))
              for u, kw in calls),
            return_exceptions=True)
        for (u, _), r in zip(calls, results, strict=True):
            answers.setdefault(u, []).append(r)

    try:
        run_app(settings, scenario)
        deadline = time.monotonic() + 10
        while len(seen) < 36 and time.monotonic() < deadline:
            publisher.flush_published(1)
            time.sleep(0.01)
    finally:
        unsubscribe()
    groups, starts = (b - a for a, b in zip(before, group_sizes(), strict=True))
    assert starts == 12 * 3 + 4 and groups < starts, (groups, starts)
    same_answers, other_answers = answers.pop(same), answers.pop(other)
    if isinstance(other_answers[0], BaseException):  # the same arguments came first
        first, second = same_answers
        assert first == second and (first.status, first.held) == ("accessible", 1)
        assert type(other_answers[0]).__name__ == "Conflict"
    else:
        assert (other_answers[0].status, other_answers[0].held) == ("accessible", 3)
        assert [type(r).__name__ for r in same_answers] == ["Conflict"] * 2
    (unknown,) = [a for u, a in answers.items() if u.startswith("nobody-")]
    assert [type(r).__name__ for r in unknown] == ["AccountNotFound"]
    for user in users:
        mine = answers[user]
        assert sorted((r.status, r.token) for r in mine) == [
            ("accessible", 1), ("accessible", 3), ("not-accessible", 1)], mine
        events = [(n.event, n.balance) for n in seen if n.user_id == user]
        assert events == [("balance_changed", 3), ("balance_changed", 1),
                          ("balance_low", 1)], (user, events)
    with session_scope(db) as session:
        held = dict(session.execute(text(
            "SELECT user_id, sum(amount) FROM holds WHERE user_id = ANY(:u) GROUP BY user_id"
        ), {"u": users}).all())
        assert session.scalar(text("SELECT count(*) FROM holds WHERE key = :k"),
                              {"k": key}) == 1
    assert held == {u: 4 for u in users}
    assert_verified(db)


def group_write_size(statements: Any) -> int:
    """Starts written by the group write that begins ``statements`` (0: not one)."""
    if statements[0][0] != WRITE:
        return 0
    return len(json.loads(statements[0][1]["holds"]))


def start_each_once(settings: Settings, db: Settings, users: list[str]) -> list[Any]:
    """One start of 1 credit per user, all at once on the app's pool; then each answered
    ``accessible`` with 4 left and held exactly once, and the ledger verifies."""
    results: list[Any] = []

    async def scenario(app: Any) -> None:
        pool = app.state.api.start_pool
        results.extend(await asyncio.gather(*(pool.start(req(u, "project_creation"))
                                              for u in users)))

    run_app(settings, scenario)
    assert [(r.status, r.token, r.held) for r in results] == \
        [("accessible", 4, 1)] * len(users)
    with session_scope(db) as session:
        holds = session.scalars(select(Hold).where(Hold.user_id.in_(users))).all()
    assert sorted(h.id for h in holds) == sorted(r.hold_id for r in results)
    assert_verified(db)
    return results


def test_a_group_that_fails_as_a_whole_is_tried_again_one_start_at_a_time(
        settings: Settings, db: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first group's write fails (a deadlock, injected after its reads): every start
    of it is run again on its own, and each holds exactly once."""
    users = [uid("regroup") for _ in range(6)]
    open_accounts(db, *users)
    real = PipeConnection.roundtrip
    failed: list[int] = []

    async def deadlock_once(self: PipeConnection, statements: Any) -> Any:
        if not failed and group_write_size(statements) > 1:
            failed.append(group_write_size(statements))
            raise psycopg.errors.DeadlockDetected("deadlock detected (injected)")
        return await real(self, statements)

    monkeypatch.setattr(PipeConnection, "roundtrip", deadlock_once)
    start_each_once(settings, db, users)
    assert failed and failed[0] > 1


def test_a_start_cancelled_while_waiting_for_its_group_never_runs(settings: Settings,
                                                                   db: Settings) -> None:
    """With the pool's one connection waiting on a locked account, a start queued behind
    it and cancelled never holds; the pool then goes on as usual."""
    busy, waiting = uid("busy"), uid("cancelled")
    open_accounts(db, busy, waiting)
    pool = StartPool(settings, 1)
    conninfo = pool.conninfo

    async def scenario() -> None:
        locker = await psycopg.AsyncConnection.connect(conninfo)
        try:
            await locker.execute("SELECT 1 FROM accounts WHERE user_id = %s FOR UPDATE",
                                 (busy,))
            first = asyncio.ensure_future(pool.start(req(busy, "project_creation")))
            await asyncio.sleep(0.3)  # its group holds the connection, waiting on the lock
            second = asyncio.ensure_future(pool.start(req(waiting, "project_creation")))
            await asyncio.sleep(0.1)
            assert not first.done() and not second.done()
            second.cancel()
            await locker.commit()
            assert (await first).status == "accessible"
            with pytest.raises(asyncio.CancelledError):
                await second
            await asyncio.sleep(0.2)
            assert (await pool.start(req(busy, "project_creation"))).token == 3
        finally:
            await locker.close()
            await pool.close()

    asyncio.run(scenario())
    with session_scope(db) as session:
        held = session.scalars(select(Hold.user_id).where(Hold.user_id.in_([busy, waiting]))
                               ).all()
    assert sorted(held) == [busy, busy]
    assert_verified(db)


def test_a_group_whose_commit_answer_was_lost_is_retried_without_holding_twice(
        settings: Settings, db: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """A group of starts commits, but the connection breaks before the answer arrives:
    each start is tried again on its own, finds the outcome its first attempt stored
    under its hold key, and answers it: one hold per start."""
    users = [uid("doubt") for _ in range(5)]
    open_accounts(db, *users)
    real = PipeConnection.roundtrip
    lost: list[int] = []

    async def answer_lost_once(self: PipeConnection, statements: Any) -> Any:
        rows = await real(self, statements)
        if not lost and statements[-1] is COMMIT and group_write_size(statements) > 1:
            lost.append(group_write_size(statements))
            self.abandon()
            raise ConnectionLost("connection lost after the commit was sent")
        return rows

    monkeypatch.setattr(PipeConnection, "roundtrip", answer_lost_once)
    start_each_once(settings, db, users)
    assert lost and lost[0] > 1, "no group's answer was lost"


def test_two_api_processes_racing_on_one_account_never_overspend(settings: Settings,
                                                                 db: Settings) -> None:
    """Two start pools (as two API processes have) each start 20 holds of 1 on one
    account with 5 credits at once: the account's lock, not the pools' own ordering,
    keeps it to exactly 5 holds; and one key raced by both pools, for two accounts,
    holds once."""
    user, first, second = uid("pools"), uid("pools-a"), uid("pools-b")
    for u in (user, first, second):
        apply(db, {"type": "open_account", "key": f"open:{u}", "user_id": u})
    key = f"pools-{uuid.uuid4().hex}"
    outcomes: list[Any] = []
    keyed: list[Any] = []

    async def scenario() -> None:
        pools = [StartPool(settings, 4), StartPool(settings, 4)]
        try:
            outcomes.extend(await asyncio.gather(
                *(pool.start(req(user, "project_creation")) for _ in range(20) for pool in pools)))
            keyed.extend(await asyncio.gather(
                pools[0].start(req(first, "project_creation"), key),
                pools[1].start(req(second, "project_creation"), key), return_exceptions=True))
        finally:
            for pool in pools:
                await pool.close()

    asyncio.run(scenario())
    accessible = [o for o in outcomes if o.status == "accessible"]
    assert len(accessible) == 5 and len(outcomes) == 40
    assert sorted(o.token for o in accessible) == [0, 1, 2, 3, 4]
    assert sorted(type(o).__name__ for o in keyed) == ["Conflict", "StartResult"]
    with session_scope(db) as session:
        assert session.scalar(text("SELECT sum(amount) FROM holds WHERE user_id = :u"),
                              {"u": user}) == 5
        assert session.scalar(text("SELECT count(*) FROM holds WHERE key = :k"),
                              {"k": key}) == 1
    assert_verified(db)


def test_a_migration_that_changes_what_prepared_statements_answer_costs_no_start(
        settings: Settings, db: Settings, caplog: pytest.LogCaptureFixture) -> None:
    """A column the start's statements answer changes its collation while the API runs
    (as migration 0009 did): the connection's prepared statements fail ("cached plan
    must not change result type"), the connection is dropped, and the start is tried
    again on a new one."""
    user = uid("migrated")
    apply(db, {"type": "open_account", "key": f"open:{user}", "user_id": user})
    pool = StartPool(settings, 1)
    alter = 'ALTER TABLE wallets ALTER COLUMN wallet_type TYPE varchar(32) COLLATE "{}"'
    results: list[Any] = []

    async def scenario() -> None:
        try:
            results.append(await pool.start(req(user, "project_creation")))
            async with await psycopg.AsyncConnection.connect(pool.conninfo,
                                                             autocommit=True) as conn:
                await conn.execute(alter.format("default"))
                try:
                    results.append(await pool.start(req(user, "project_creation")))
                finally:
                    await conn.execute(alter.format("C"))
        finally:
            await pool.close()

    with caplog.at_level("WARNING", logger="tokenledger.tokenprocess.pool"):
        asyncio.run(scenario())
    assert [(r.status, r.token) for r in results] == [("accessible", 4), ("accessible", 3)]
    assert any("no longer fit the schema" in r.getMessage() for r in caplog.records)
    assert_verified(db)


# -- the start pool's connections ----------------------------------------------------------


def test_a_pipeline_connection_survives_a_failed_round_trip(settings: Settings) -> None:
    """Statements prepared in a round trip that then failed stay known (never prepared
    twice), and the failed transaction rolls back cleanly."""
    conninfo = StartPool(settings, 1).conninfo

    async def scenario() -> None:
        conn = await PipeConnection.connect(conninfo)
        try:
            with pytest.raises(psycopg.errors.DivisionByZero):
                await conn.roundtrip([BEGIN, ("SELECT 1 / :n", {"n": 0})])
            assert not conn.idle
            assert await conn.roundtrip([ROLLBACK]) == [[]] and conn.idle
            rows = await conn.roundtrip([BEGIN, ("SELECT 1 / :n", {"n": 1}), COMMIT])
            assert rows == [[], [(1,)], []] and conn.idle
        finally:
            await conn.close()

    asyncio.run(scenario())


def test_one_idempotency_key_raced_by_two_accounts_applies_once(settings: Settings,
                                                                db: Settings) -> None:
    """Two starts with one key for two accounts at once: one holds, the other collides
    on the key, is retried, finds the first one's outcome and is a conflict."""
    users = [uid("raced"), uid("raced")]
    open_accounts(db, *users)
    key = f"raced-{uuid.uuid4().hex}"

    outcomes: list[Any] = []

    async def scenario(app: Any) -> None:
        pool = app.state.api.start_pool
        outcomes.extend(await asyncio.gather(
            *(pool.start(req(user, "project_creation"), key) for user in users),
            return_exceptions=True))

    run_app(settings, scenario)
    started = [o for o in outcomes if not isinstance(o, BaseException)]
    assert len(started) == 1 and started[0].status == "accessible", outcomes
    assert [type(o).__name__ for o in outcomes if isinstance(o, BaseException)] == [
        "Conflict"]
    with session_scope(db) as session:
        assert session.scalar(text("SELECT count(*) FROM holds WHERE key = :k"),
                              {"k": key}) == 1
    assert_verified(db)


def test_a_start_whose_commit_answer_was_lost_is_retried_without_holding_twice(
        settings: Settings, db: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """The connection breaks after the write and its COMMIT were sent and done (the answer
    never arrives): the start, keyless, is retried on another connection, finds its own
    outcome under the hold key it made up, and answers it: one hold, one debit."""
    user = uid("lost")
    apply(db, {"type": "open_account", "key": f"open:{user}", "user_id": user})
    real = PipeConnection.roundtrip
    lost: list[int] = []

    async def answer_lost_once(self: PipeConnection, statements: Any) -> Any:
        rows = await real(self, statements)
        if not lost and statements[-1] is COMMIT and len(statements) == 2:
            lost.append(1)
            self.abandon()
            raise ConnectionLost("connection lost after the commit was sent")
        return rows

    monkeypatch.setattr(PipeConnection, "roundtrip", answer_lost_once)
    results: list[Any] = []

    async def scenario(app: Any) -> None:
        results.append(await app.state.api.start_pool.start(req(user, "project_creation")))

    run_app(settings, scenario)
    assert lost, "the commit's answer was never lost"
    (result,) = results
    assert (result.status, result.token, result.held) == ("accessible", 4, 1)
    with session_scope(db) as session:
        holds = session.scalars(select(Hold).where(Hold.user_id == user)).all()
    assert [h.id for h in holds] == [result.hold_id]
    assert_verified(db)


def test_a_key_in_steady_use_is_refreshed_before_it_expires_and_revoked_in_time(
        http: httpx.Client, db: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """Starts every few milliseconds for three cache lifetimes: the key is looked up again
    in the background before its answer expires, so no start finds it missing (which sent
    every request of that moment down the slow path to look it up); once revoked, starts
    are refused within a cache lifetime, while they keep coming."""
    from tokenledger.api import auth as auth_module

    user = uid("steady")
    apply(db, {"type": "open_account", "key": f"open:{user}", "user_id": user,
               "plan": "Business"})
    with session_scope(db) as session:
        created = create_key(session, "producer", "steady")
    headers, body = auth(created.key), {"user_id": user, "feature_endpoint_id": "project_creation"}
    assert http.post(PATH, headers=headers, json=body).status_code == 200  # cached now
    real_lookup, real_refresh = auth_module._lookup, auth_module._refresh
    calls = {"lookup": 0, "refresh": 0}

    def counted_lookup(url: str, key: str) -> Any:
        calls["lookup"] += 1
        return real_lookup(url, key)

    def counted_refresh(state: Any, key: str) -> None:
        calls["refresh"] += 1
        real_refresh(state, key)

    monkeypatch.setattr(auth_module, "_lookup", counted_lookup)
    monkeypatch.setattr(auth_module, "_refresh", counted_refresh)
    deadline = time.monotonic() + 3 * KEY_CACHE_SECONDS
    while time.monotonic() < deadline:
        assert http.post(PATH, headers=headers, json=body).status_code == 200
    assert calls["refresh"] >= 2
    assert calls["lookup"] == calls["refresh"], calls  # every lookup was a refresh

    with session_scope(db) as session:
        revoke_key(session, created.info.prefix)
    revoked_at = time.monotonic()
    while http.post(PATH, headers=headers, json=body).status_code == 200:
        assert time.monotonic() - revoked_at < KEY_CACHE_SECONDS + 0.5
    assert http.post(PATH, headers=headers, json=body).status_code == 401


# -- the start's statements at scale ----------------------------------------------------------

START_TABLES = ("accounts", "wallets", "ledger_entries", "holds", "event_outcomes",
                "low_balance_state")


def scanned(plan: list[str]) -> list[str]:
    """The start's tables a plan reads whole."""
    return [line.strip() for line in plan
            if "Seq Scan on" in line and line.split("Seq Scan on ")[1].split()[0]
            in START_TABLES]


def test_starts_read_a_large_ledger_by_index_only(settings: Settings, db: Settings) -> None:
    """Given 20,000 accounts with a wallet, an entry, a hold and an outcome each (2,000 of
    them marked low), analyzed: after groups of starts on the pool, the generic plan of
    every statement the pool prepared (the plans its starts run) reads no table whole;
    nor do the SDK's statements. (A group's draws given as a JSON recordset, which the
    planner counts as a hundred rows, made each group scan every wallet.)"""
    with psycopg.connect(db.ledger_url().replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO accounts (user_id, plan_code, timezone)"
            " SELECT 'big-' || i, 'Free', 'UTC' FROM generate_series(1, 20000) AS i")
        conn.execute(
            "INSERT INTO wallets (account_id, wallet_type, balance, is_active)"
            " SELECT id, 'STANDARD', 5, true FROM accounts")
        conn.execute(
            "INSERT INTO ledger_entries (account_id, wallet_id, amount, balance_before,"
            " balance_after, type, event_key) SELECT account_id, id, 5, 0, 5, 'OPEN',"
            " 'open:' || account_id FROM wallets")
        conn.execute(
            "INSERT INTO holds (key, account_id, user_id, feature, amount, allocations,"
            " status, expires_at) SELECT 'old:' || id, id, user_id, 'project_creation', 0,"
            " '[]', 'open', now() + interval '1 hour' FROM accounts")
        conn.execute(
            "INSERT INTO event_outcomes (key, payload_hash, user_id, event_type, outcome)"
            " SELECT 'open:' || id, 'x', user_id, 'open_account', 'applied' FROM accounts")
        conn.execute(
            "INSERT INTO low_balance_state (user_id, threshold, balance, ledger_seq)"
            " SELECT user_id, 1, 1, id FROM accounts WHERE id % 10 = 0")
        conn.execute(f"ANALYZE {', '.join(START_TABLES)}")
    users = [f"big-{i}" for i in range(1, 20001, 997)]  # some of them marked low
    plans: dict[str, list[str]] = {}

    async def scenario() -> None:
        pool = StartPool(settings, 1)  # one connection: every statement prepared on it
        try:
            results = await asyncio.gather(
                *(pool.start(req(u, "text_generation", hold=2)) for u in users))
            assert [r.status for r in results] == ["accessible"] * len(users)
            (conn,) = pool._idle  # noqa: SLF001 - the plans of its prepared statements
            for (sql, types), name in list(conn.prepared.items()):
                if types:  # every variant's plan (parameter types differ per variant)
                    args = ", ".join(["NULL"] * len(types))
                    (rows,) = await conn.roundtrip(
                        [(f"EXPLAIN EXECUTE {name.decode()}({args})", {})])
                    plans.setdefault(sql, []).extend(row[0] for row in rows)
        finally:
            await pool.close()

    asyncio.run(scenario())
    assert WRITE in plans and LOCK_WALLETS in plans, list(plans)
    assert {sql: scanned(plan) for sql, plan in plans.items()} == {sql: [] for sql in plans}
    # The SDK's statements (custom plans, with the values), for one start.
    user = users[0]
    with psycopg.connect(db.ledger_url().replace("+psycopg", "")) as conn:
        from tokenledger.catalog.service import current_catalog

        with session_scope(db) as session:
            catalog = current_catalog(session)
        rows = []
        now = datetime.now(UTC)
        for sql, params in start_service.reads([user], ["k"], now):
            explained = [r[0] for r in conn.execute("EXPLAIN " + pyformat(sql), params)]
            assert scanned(explained) == [], explained
            rows.append(conn.execute(pyformat(sql), params).fetchall())
        decision = start_service.decide(start_service.Locked.of(rows),
                                        req(user, "project_creation"), "k", now=now,
                                        hold_ttl_seconds=60, catalog=catalog)
        sql, params = start_service.write([decision], now)
        explained = [r[0] for r in conn.execute("EXPLAIN " + pyformat(sql), params)]
        assert scanned(explained) == [], explained
        conn.rollback()
