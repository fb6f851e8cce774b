"""The operators' pages over HTTP: signing in, each page, each action through its
confirmation, and the CSRF and session rules."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator

import httpx
import pytest
from sqlalchemy import func, select

from tests.api.support import ServerThread, api_server, auth, keys
from tests.dashboard.support import admin_key, hidden, sign_in
from tests.support import Worker, apply, assert_verified, session_scope
from tokenledger import LedgerClient, Settings
from tokenledger.apikeys.service import create_key, revoke_key
from tokenledger.db.uow import unit_of_work
from tokenledger.ledger.models import Account, EventConflict, LedgerEntry
from tokenledger.queue import deadletters
from tokenledger.queue.models import DeadLetter
from tokenledger.renewals.models import RenewalRun

pytestmark = pytest.mark.services
__all__ = ["admin_key", "api_server", "keys"]  # fixtures used by name

PAGES = ["/dashboard/ops/accounts", "/dashboard/ops/runs", "/dashboard/ops/dead-letters",
         "/dashboard/ops/conflicts", "/dashboard/ops/queue", "/dashboard/ops/usage",
         "/dashboard/ops/queue/workers"]


@pytest.fixture
def browser_like(api_server: ServerThread) -> Iterator[httpx.Client]:
    """A client that keeps cookies, like a browser, and does not follow redirects."""
    with httpx.Client(base_url=api_server.url, timeout=60) as c:
        yield c


def open_account(settings: Settings, user_id: str, plan: str = "Free") -> None:
    apply(settings, {"type": "open_account", "key": f"open:{user_id}", "user_id": user_id,
                     "plan": plan})


def act(http: httpx.Client, csrf: str, name: str, **fields: str) -> httpx.Response:
    """Post an action's form, then confirm it as its confirmation page asks."""
    first = http.post(f"/dashboard/ops/actions/{name}", data={"csrf": csrf, **fields})
    assert first.status_code == 200, first.text
    assert 'id="confirm-form"' in first.text, first.text
    again = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">',
                            first.text))
    return http.post(f"/dashboard/ops/actions/{name}", data=again)


def test_pages_need_an_admin_key_or_session(browser_like: httpx.Client, keys: dict) -> None:
    for path in PAGES:
        r = browser_like.get(path)
        assert r.status_code == 303, path
        assert r.headers["location"].startswith("/dashboard/login?next=")
        for scope in ("reader", "producer"):
            r = browser_like.get(path, headers=auth(keys[scope]))
            assert r.status_code == 403 and "admin" in r.text, (path, scope)
        r = browser_like.get(path, headers=auth(keys["admin"]))
        assert r.status_code == 200, (path, r.text)


def test_signing_in_sets_a_strict_http_only_session_that_the_key_revocation_ends(
        browser_like: httpx.Client, admin_key: str, settings: Settings) -> None:
    browser_like.get("/dashboard/login")
    # Without the form's token (another site's form), nothing happens.
    r = browser_like.post("/dashboard/login", data={"api_key": admin_key, "csrf": "x"})
    assert r.status_code == 403 and "tl_operator" not in r.headers.get("set-cookie", "")
    form = browser_like.get("/dashboard/login")  # each form has its own token
    r = browser_like.post("/dashboard/login", data={
        "api_key": admin_key, "csrf": hidden(form.text, "csrf"), "next": "https://evil.example"})
    assert r.status_code == 303 and r.headers["location"] == "/dashboard/ops/accounts"
    cookie = r.headers["set-cookie"]
    assert "tl_operator=" in cookie and "HttpOnly" in cookie
    assert "SameSite=strict" in cookie or "samesite=strict" in cookie.lower()
    assert admin_key not in cookie and admin_key.split("_")[2] not in cookie
    assert browser_like.get("/dashboard/ops/runs").status_code == 200
    with session_scope(settings) as session:
        revoke_key(session, admin_key)
    assert browser_like.get("/dashboard/ops/runs").status_code == 303


def test_only_admin_keys_sign_in(browser_like: httpx.Client, keys: dict) -> None:
    for key, status in ((keys["reader"], 403), ("tl_nope", 401), ("", 401)):
        form = browser_like.get("/dashboard/login")
        r = browser_like.post("/dashboard/login", data={
            "api_key": key, "csrf": hidden(form.text, "csrf")})
        assert r.status_code == status, r.text
        assert "tl_operator" not in r.headers.get("set-cookie", "")


def test_every_form_needs_the_sessions_csrf_token(browser_like: httpx.Client,
                                                  admin_key: str, settings: Settings) -> None:
    open_account(settings, "alice")
    csrf = sign_in(browser_like, admin_key)
    for token in (None, "", csrf[:-1] + ("A" if csrf[-1] != "A" else "B")):
        data = {"user_id": "alice", "plan": "Gift", "confirm": "yes"}
        if token is not None:
            data["csrf"] = token
        r = browser_like.post("/dashboard/ops/actions/change-plan", data=data)
        assert r.status_code == 403, r.text
    r = browser_like.post("/dashboard/logout", data={})
    assert r.status_code == 403
    with session_scope(settings) as s:
        assert s.scalar(select(Account.plan_code).where(Account.user_id == "alice")) == "Free"
    r = browser_like.post("/dashboard/logout", data={"csrf": csrf})
    assert r.status_code == 303
    assert browser_like.get("/dashboard/ops/accounts").status_code == 303


def test_open_an_account_and_change_its_plan_through_the_confirmation(
        browser_like: httpx.Client, admin_key: str, settings: Settings) -> None:
    csrf = sign_in(browser_like, admin_key)
    first = browser_like.post("/dashboard/ops/actions/open-account", data={
        "csrf": csrf, "user_id": "new-user", "plan": "Gift", "timezone": "Europe/Paris"})
    assert "Open this account?" in first.text and "100" in first.text
    with session_scope(settings) as s:  # nothing yet: only a confirmation
        assert s.scalar(select(func.count()).select_from(Account)) == 0
    r = act(browser_like, csrf, "open-account", user_id="new-user", plan="Gift",
            timezone="Europe/Paris")
    assert r.status_code == 303
    page = browser_like.get(r.headers["location"])
    assert "Account opened." in page.text and 'id="balance">100<' in page.text
    again = browser_like.post("/dashboard/ops/actions/open-account", data={
        "csrf": csrf, "user_id": "new-user", "plan": "Gift"})
    assert again.status_code == 409 and "already has an account" in again.text
    bad = browser_like.post("/dashboard/ops/actions/open-account", data={
        "csrf": csrf, "user_id": "x", "timezone": "Mars/Base"})
    assert bad.status_code == 400 and "timezone" in bad.text

    r = act(browser_like, csrf, "change-plan", user_id="new-user", plan="Business")
    assert r.status_code == 303
    assert "Business plan" in browser_like.get(r.headers["location"]).text
    unknown = browser_like.post("/dashboard/ops/actions/change-plan", data={
        "csrf": csrf, "user_id": "new-user", "plan": "Platinum", "confirm": "yes"})
    assert unknown.status_code == 409 and "unknown plan" in unknown.text
    assert_verified(settings)


def test_a_credit_goes_through_the_workers_once(browser_like: httpx.Client, admin_key: str,
                                                settings: Settings, worker: Worker) -> None:
    open_account(settings, "bob")
    csrf = sign_in(browser_like, admin_key)
    first = browser_like.post("/dashboard/ops/actions/credit", data={
        "csrf": csrf, "user_id": "bob", "amount": "250", "wallet_type": "PREMIUM",
        "reason": "goodwill"})
    assert "Credit 250 to bob?" in first.text
    confirm = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">',
                              first.text))
    done = browser_like.post("/dashboard/ops/actions/credit", data=confirm)
    assert done.status_code == 200 and "Credited" in done.text, done.text
    assert "balance now 255" in done.text
    # The same confirmation sent twice (a double click, a reload) credits once.
    browser_like.post("/dashboard/ops/actions/credit", data=confirm)
    with LedgerClient(settings) as client:
        assert client.balance("bob").balance == 255
    bad = browser_like.post("/dashboard/ops/actions/credit", data={
        "csrf": csrf, "user_id": "bob", "amount": "-5"})
    assert bad.status_code == 400
    missing = browser_like.post("/dashboard/ops/actions/credit", data={
        "csrf": csrf, "user_id": "nobody", "amount": "5"})
    assert missing.status_code == 404
    assert_verified(settings)


def test_a_dead_letter_is_retried_once_its_account_exists(
        browser_like: httpx.Client, admin_key: str, settings: Settings,
        worker: Worker) -> None:
    """A charge for an account opened late is dead-lettered; once the account is open,
    the retry applies it."""
    with LedgerClient(settings) as client:
        key = client.charge("late", amount=2, key="late-charge")
        deadline = time.monotonic() + 30
        while client.result(key).status != "dead_lettered" and time.monotonic() < deadline:
            time.sleep(0.05)
        open_account(settings, "late")
        csrf = sign_in(browser_like, admin_key)
        listing = browser_like.get("/dashboard/ops/dead-letters")
        assert "late-charge" in listing.text and "account not found" in listing.text
        letter = int(re.search(r'id="dead-letter-(\d+)"', listing.text).group(1))
        r = act(browser_like, csrf, "retry-dead-letter", id=str(letter))
        assert r.status_code == 303
        assert "published again" in browser_like.get(r.headers["location"]).text
        assert client.result(key, timeout=30).status == "applied"
        assert client.balance("late").balance == 3
    with session_scope(settings) as s:
        assert s.scalar(select(func.count()).select_from(DeadLetter)) == 0


def test_a_dead_letter_can_be_dropped(browser_like: httpx.Client, admin_key: str,
                                      settings: Settings) -> None:
    with unit_of_work(settings) as uow:
        deadletters.record(uow.session, "{not json", "invalid JSON", uow.now)
    csrf = sign_in(browser_like, admin_key)
    listing = browser_like.get("/dashboard/ops/dead-letters")
    assert "{not json" in listing.text
    letter = re.search(r'id="dead-letter-(\d+)"', listing.text).group(1)
    r = act(browser_like, csrf, "drop-dead-letter", id=letter)
    assert r.status_code == 303
    assert 'id="dlq-empty"' in browser_like.get(r.headers["location"]).text
    gone = browser_like.post("/dashboard/ops/actions/retry-dead-letter",
                             data={"csrf": csrf, "id": letter})
    assert gone.status_code == 404


def test_a_conflict_is_shown_beside_the_stored_outcome_and_applied_under_a_new_key(
        browser_like: httpx.Client, admin_key: str, settings: Settings,
        worker: Worker) -> None:
    open_account(settings, "carol", plan="Gift")
    apply(settings, {"type": "charge", "key": "order-7", "user_id": "carol", "amount": 3})
    apply(settings, {"type": "charge", "key": "order-7", "user_id": "carol", "amount": 4})
    csrf = sign_in(browser_like, admin_key)
    listing = browser_like.get("/dashboard/ops/conflicts")
    assert "order-7" in listing.text and "applied" in listing.text
    assert "&#34;amount&#34;: 4" in listing.text
    conflict = re.search(r'id="conflict-(\d+)"', listing.text).group(1)
    r = act(browser_like, csrf, "retry-conflict", id=conflict)
    assert r.status_code == 200 and f"order-7#conflict-{conflict}" in r.text
    with LedgerClient(settings) as client:
        assert client.result(f"order-7#conflict-{conflict}", timeout=30).status == "applied"
        assert client.balance("carol").balance == 100 - 3 - 4
    with session_scope(settings) as s:
        assert s.scalar(select(func.count()).select_from(EventConflict)) == 0
    apply(settings, {"type": "charge", "key": "order-8", "user_id": "carol", "amount": 1})
    apply(settings, {"type": "charge", "key": "order-8", "user_id": "carol", "amount": 9})
    listing = browser_like.get("/dashboard/ops/conflicts")
    conflict = re.search(r'id="conflict-(\d+)"', listing.text).group(1)
    assert act(browser_like, csrf, "drop-conflict", id=conflict).status_code == 303
    assert_verified(settings)


def test_a_dry_run_is_started_and_reported(browser_like: httpx.Client, admin_key: str,
                                           settings: Settings, worker: Worker) -> None:
    for n in range(3):
        open_account(settings, f"g{n}", plan="Gift")
    with session_scope(settings) as s:
        s.execute(Account.__table__.update().values(
            last_renewal_at=func.now() - func.make_interval(0, 0, 0, 31)))
    csrf = sign_in(browser_like, admin_key)
    first = browser_like.post("/dashboard/ops/actions/dry-run", data={
        "csrf": csrf, "kind": "monthly", "tier": "Gift", "limit": ""})
    assert "accounts due now" in first.text and ">3<" in first.text
    r = act(browser_like, csrf, "dry-run", kind="monthly", tier="Gift", limit="")
    assert r.status_code == 303
    run_path = r.headers["location"].split("?")[0]
    deadline = time.monotonic() + 30
    while True:
        page = browser_like.get(run_path)
        if 'id="run-status">completed<' in page.text or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert 'id="run-status">completed<' in page.text, page.text
    assert "dry run" in page.text and 'id="processed">3<' in page.text
    with session_scope(settings) as s:
        run = s.scalar(select(RenewalRun))
        assert (run.dry_run, run.trigger) == (True, "dashboard")
        assert s.scalar(select(func.count()).select_from(LedgerEntry).where(
            LedgerEntry.type == "RENEWAL")) == 0
    listing = browser_like.get("/dashboard/ops/runs")
    assert f'href="{run_path}"' in listing.text


def test_an_operator_mints_a_user_link_without_confirmation(
        browser_like: httpx.Client, admin_key: str, settings: Settings) -> None:
    open_account(settings, "dora")
    csrf = sign_in(browser_like, admin_key)
    r = browser_like.post("/dashboard/ops/actions/user-link",
                          data={"csrf": csrf, "user_id": "dora", "minutes": "5"})
    assert r.status_code == 200 and "/dashboard/u/v1." in r.text
    link = re.search(r'href="(http[^"]+/dashboard/u/[^"]+)"', r.text).group(1)
    assert "dora" in httpx.get(link).text


def test_pages_show_what_the_ledger_holds(browser_like: httpx.Client, keys: dict,
                                          settings: Settings) -> None:
    open_account(settings, "erin", plan="Business")
    apply(settings, {"type": "token_process_end", "key": "llm-1", "user_id": "erin",
                     "feature_endpoint_id": "text_generation", "input_tokens": 1200,
                     "output_tokens": 3400, "model": "gemini-pro"})
    apply(settings, {"type": "charge", "key": "img-1", "user_id": "erin",
                     "feature": "image_generation"})
    with session_scope(settings) as s:
        create_key(s, "admin", "other")
    admin = auth(keys["admin"])
    account = browser_like.get("/dashboard/ops/account", params={"user_id": "erin"},
                               headers=admin)
    assert "llm-1" in account.text and "img-1" in account.text and "applied" in account.text
    usage = browser_like.get("/dashboard/ops/usage", params={"user_id": "erin"},
                             headers=admin)
    assert usage.status_code == 200
    assert "<svg" in usage.text and "gemini-pro" in usage.text
    assert 'id="monthly-report"' in usage.text and "image_generation" in usage.text
    outcome = browser_like.get("/dashboard/ops/outcome", params={"key": "img-1"},
                               headers=admin)
    assert "applied" in outcome.text and json.dumps("erin")[1:-1] in outcome.text
    queue = browser_like.get("/dashboard/ops/queue", headers=admin)
    assert "<svg" in queue.text and "events/s" in queue.text
    search = browser_like.get("/dashboard/ops/accounts", params={"q": "er"}, headers=admin)
    assert "erin" in search.text
    none = browser_like.get("/dashboard/ops/accounts", params={"q": "%"}, headers=admin)
    assert "erin" not in none.text  # LIKE wildcards are taken literally
    for path in ("/dashboard/ops/account?user_id=ghost", "/dashboard/ops/runs/999999"):
        assert browser_like.get(path, headers=admin).status_code == 404
    assert browser_like.get("/dashboard/ops/usage?credit_value=abc",
                            headers=admin).status_code == 400
