"""The end user's pages over HTTP: what a link shows, and everything it does not grant."""

from __future__ import annotations

import json
import re
import threading
import time
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import text

from tests.api.support import api_server, auth, http, keys
from tests.dashboard.support import user_path
from tests.support import apply, session_scope
from tokenledger import Settings
from tokenledger.dashboard.links import mint
from tokenledger.timeutil import utcnow
from tokenledger.tokenprocess.models import Hold

pytestmark = pytest.mark.services
__all__ = ["api_server", "http", "keys"]  # fixtures used by name


def open_account(settings: Settings, user_id: str, plan: str = "Free",
                 timezone: str = "UTC") -> None:
    apply(settings, {"type": "open_account", "key": f"open:{user_id}", "user_id": user_id,
                     "plan": plan, "timezone": timezone})


def charge(settings: Settings, user_id: str, key: str, **fields: object) -> None:
    result = apply(settings, {"type": "charge", "key": key, "user_id": user_id, **fields})
    assert result.results[0].status == "applied", result.results[0]


def text_of(page: str) -> str:
    """A page's visible text, roughly: tags out, whitespace folded."""
    return " ".join(re.sub(r"<[^>]+>", " ", page).split())


def test_the_overview_shows_balance_wallets_holds_readiness_and_next_reset(
        http: httpx.Client, settings: Settings, db: Settings) -> None:
    """Given a Free account in Bangkok with 5 tokens, a PROMO wallet and an open hold,
    its page shows all of it, project creation ready, and the next local midnight."""
    open_account(settings, "alice", timezone="Asia/Bangkok")
    apply(settings, {"type": "credit", "key": "promo", "user_id": "alice", "amount": 7,
                     "wallet_type": "PROMO",
                     "expires_at": (utcnow() + timedelta(days=3)).isoformat()})
    with session_scope(settings) as s:
        account_id = s.execute(text(
            "SELECT id FROM accounts WHERE user_id = 'alice'")).scalar_one()
        s.add(Hold(key="h1", account_id=account_id, user_id="alice", feature="text_generation",
                   amount=0, allocations=[], status="open",
                   expires_at=utcnow() + timedelta(minutes=10)))
    r = http.get(user_path(settings, "alice"))
    assert r.status_code == 200, r.text
    seen = text_of(r.text)
    assert re.search(r'id="balance">12<', r.text)
    assert "Free plan" in seen and "PROMO" in seen and "STANDARD" in seen
    assert 'id="project-status">ready<' in r.text
    assert "text_generation" in seen  # the open hold
    assert "Next reset" in seen and "Asia/Bangkok" in seen
    # image generation is not in the Free plan: not listed as usable
    assert "image_generation" not in seen
    assert r.headers["cache-control"] == "no-store"
    assert r.headers["referrer-policy"] == "no-referrer"
    assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    assert float(r.headers["server-timing"].split("dur=")[1]) > 0


def test_an_empty_account_is_not_ready_to_create_a_project(http: httpx.Client,
                                                          settings: Settings,
                                                          db: Settings) -> None:
    open_account(settings, "bob")
    for n in range(5):
        charge(settings, "bob", f"p{n}", feature="project_creation")
    r = http.get(user_path(settings, "bob"))
    assert 'id="project-status">not ready<' in r.text
    assert "Insufficient tokens (required 1, available 0)" in r.text


def test_history_filters_by_type_and_local_date_and_pages_by_keyset(
        http: httpx.Client, settings: Settings, db: Settings) -> None:
    open_account(settings, "carol", plan="Business")
    for n in range(120):
        charge(settings, "carol", f"c{n}", amount=1 + n % 3)
    base = user_path(settings, "carol") + "/history"
    first = http.get(base)
    assert first.status_code == 200
    assert first.text.count("<tr>") - 1 == 50  # header row + 50 entries
    older = re.search(r'href="([^"]+)" id="older"', first.text).group(1)
    second = http.get(older.replace("&amp;", "&"))
    assert second.status_code == 200 and 'id="newer"' in second.text
    third = http.get(re.search(r'href="([^"]+)" id="older"', second.text).group(1)
                     .replace("&amp;", "&"))
    # 121 entries: OPEN and 120 charges; the last page holds the oldest 21.
    assert third.text.count("<tr>") - 1 == 21 and 'id="older"' not in third.text
    assert "Opening tokens" in third.text
    opened = http.get(base, params={"type": "OPEN"})
    assert opened.text.count("<tr>") - 1 == 1
    today = utcnow().date()
    none_yet = http.get(base, params={"from": (today + timedelta(days=2)).isoformat()})
    assert "No entries." in none_yet.text
    assert http.get(base, params={"type": "NOPE"}).status_code == 400
    assert http.get(base, params={"from": "yesterday"}).status_code == 400


def test_a_link_reads_its_own_account_and_nothing_else(http: httpx.Client, keys: dict,
                                                       settings: Settings,
                                                       db: Settings) -> None:
    open_account(settings, "alice")
    open_account(settings, "mallory")
    path = user_path(settings, "mallory")
    # The token alone decides the account: no parameter can name another one.
    for probe in ("", "?user_id=alice", "/history?user_id=alice"):
        r = http.get(path + probe)
        assert r.status_code == 200 and "alice" not in r.text, probe
    token = path.rsplit("/", 1)[1]
    # It opens no operator page and no API route.
    for target in ("/dashboard/ops/accounts", "/dashboard/ops/account?user_id=alice"):
        r = http.get(target, headers={"x-server-api-key": token}, follow_redirects=False)
        assert r.status_code == 401, target
        assert http.get(target, follow_redirects=False).status_code == 303
    r = http.get("/api/billing/balance", params={"user_id": "mallory"},
                 headers=auth(token))
    assert r.status_code == 401
    # Read only: nothing but GET.
    for method in ("POST", "PUT", "DELETE"):
        assert http.request(method, path).status_code == 405
        assert http.request(method, path + "/history").status_code == 405


def test_expired_forged_and_foreign_links_open_nothing(http: httpx.Client,
                                                       settings: Settings,
                                                       db: Settings) -> None:
    open_account(settings, "alice")
    expired = mint(settings, "alice", utcnow() - timedelta(hours=1), 60).token
    r = http.get(f"/dashboard/u/{expired}")
    assert r.status_code == 403 and "expired" in r.text
    valid = user_path(settings, "alice")
    for bad in (valid[:-3] + "AAA", "/dashboard/u/v1.e30.AAAA", "/dashboard/u/nothing"):
        r = http.get(bad)
        assert r.status_code == 403 and "alice" not in r.text, bad
        assert http.get(bad + "/balance.json").status_code == 403
        assert http.get(bad + "/events").status_code == 403
    gone = user_path(settings, "nobody")
    assert http.get(gone).status_code == 404


def test_a_hostile_user_id_is_shown_as_text(http: httpx.Client, keys: dict,
                                            settings: Settings, db: Settings) -> None:
    hostile = '<script>alert("x")</script>&"\''
    open_account(settings, hostile)
    r = http.get(user_path(settings, hostile))
    assert r.status_code == 200
    assert "<script>alert" not in r.text
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;&amp;&#34;&#39;" in r.text
    page = http.get("/dashboard/ops/account", params={"user_id": hostile},
                    headers=auth(keys["admin"]))
    assert page.status_code == 200 and "<script>alert" not in page.text
    listing = http.get("/dashboard/ops/accounts", headers=auth(keys["admin"]))
    assert "<script>alert" not in listing.text and "&lt;script&gt;" in listing.text


def test_the_badge_reads_json_from_any_origin(http: httpx.Client, settings: Settings,
                                              db: Settings) -> None:
    open_account(settings, "dora")
    path = user_path(settings, "dora")
    r = http.get(path + "/balance.json", headers={"Origin": "https://app.example"})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "*"
    assert r.json()["balance"] == 5 and r.json()["userId"] == "dora"
    badge = http.get(path + "/badge")
    assert badge.status_code == 200 and "<tokenledger-balance" in badge.text
    assert "frame-ancestors *" in badge.headers["content-security-policy"]
    assert http.get("/dashboard/static/badge.js").status_code == 200


def test_the_badge_stream_follows_balance_changed(api_server: object, settings: Settings,
                                                  db: Settings) -> None:
    """The stream sends the balance at once, then again after a committed charge (the
    notice arrives through Redis, not by the stream's periodic re-read)."""
    open_account(settings, "erin")
    events: list[dict] = []
    ready = threading.Event()

    def listen() -> None:
        url = api_server.url + user_path(settings, "erin") + "/events"  # type: ignore
        with httpx.Client(timeout=30) as c, c.stream("GET", url) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
                    ready.set()
                    if len(events) == 2:
                        return

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    assert ready.wait(20), "no first balance"
    assert events[0]["balance"] == 5
    time.sleep(0.3)  # the stream is waiting for a notice now
    started = time.monotonic()
    charge(settings, "erin", "e1", amount=2)
    thread.join(15)
    assert [e["balance"] for e in events] == [5, 3]
    assert time.monotonic() - started < 5  # a notice, not the 20 s re-read
