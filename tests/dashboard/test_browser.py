"""The dashboard in a real browser (headless Chromium through Selenium) against the real
API server, PostgreSQL, Redis and a worker: an operator signs in and opens every page,
credits an account and retries a dead letter; a user follows a link and watches the
balance badge change after a charge, in the dashboard and embedded in another site's
page. Every page is saved as a screenshot (the README's, with
TOKENLEDGER_UPDATE_SCREENSHOTS=1)."""

from __future__ import annotations

import functools
import http.server
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.api.support import ServerThread, api_server
from tests.dashboard.support import admin_key, browser, screenshot
from tests.support import Worker, apply, session_scope
from tokenledger import LedgerClient, Settings
from tokenledger.ledger.models import Account
from tokenledger.queue import deadletters
from tokenledger.timeutil import utcnow

pytestmark = pytest.mark.services
__all__ = ["admin_key", "api_server", "browser"]  # fixtures used by name
WAIT = 20


def wait(driver: Any, condition: Any, timeout: float = WAIT) -> Any:
    """Until ``condition(driver)`` holds; a page that reloads itself (a running run's
    page) may replace an element while it is read, which just means: look again."""
    return WebDriverWait(driver, timeout, poll_frequency=0.05, ignored_exceptions=(
        NoSuchElementException, StaleElementReferenceException)).until(condition)


def arrange(settings: Settings) -> None:
    """A few days of a small app: accounts on each plan, charges, LLM usage priced per
    model, a purchase, a refund, a conflicting redelivery and a dead letter."""
    now = utcnow()
    users = {"acme-42": ("Professional", "Asia/Bangkok"), "free-1": ("Free", "UTC"),
             "free-2": ("Free", "Europe/Paris"), "gift-7": ("Gift", "America/New_York"),
             "gift-8": ("Gift", "UTC"), "studio-3": ("Business", "Europe/Berlin")}
    for user, (plan, tz) in users.items():
        apply(settings, {"type": "open_account", "key": f"open:{user}", "user_id": user,
                         "plan": plan, "timezone": tz}, now=now - timedelta(days=7))
    for day in range(7, -1, -1):
        when = now - timedelta(days=day, hours=1)
        events = [{"type": "charge", "key": f"img-{day}-{n}", "user_id": "acme-42",
                   "feature": "image_generation"} for n in range(day % 3 + 1)]
        events += [{"type": "token_process_end", "key": f"llm-{day}-{n}", "user_id": "acme-42",
                    "feature_endpoint_id": "text_generation", "model": model,
                    "input_tokens": 900 + 50 * n, "output_tokens": 2500 + 300 * day}
                   for n, model in enumerate(("gemini-pro", "gpt-4o")[: 1 + day % 2])]
        events.append({"type": "charge", "key": f"proj-{day}", "user_id": "gift-7",
                       "feature": "project_creation"})
        apply(settings, *events, now=when)
    apply(settings, {"type": "credit", "key": "purchase-1", "user_id": "acme-42",
                     "amount": 500, "wallet_type": "PREMIUM", "reason": "purchase",
                     "expires_at": (now + timedelta(days=30)).isoformat()})
    apply(settings, {"type": "refund", "key": "refund-1", "user_id": "acme-42",
                     "original_key": "img-0-0", "reason": "operation_failed"})
    apply(settings, {"type": "charge", "key": "order-9", "user_id": "free-1", "amount": 1})
    apply(settings, {"type": "charge", "key": "order-9", "user_id": "free-1", "amount": 2})
    with session_scope(settings) as session:
        # Two accounts a month past their last renewal: what a dry run would renew.
        session.execute(Account.__table__.update()
                        .where(Account.user_id.in_(("gift-7", "gift-8")))
                        .values(last_renewal_at=now - timedelta(days=31)))
        deadletters.record(session, {"type": "charge", "v": 1, "key": "late-1",
                                     "user_id": "late-user", "amount": 2},
                           "account not found", now, key="late-1")


def sign_in(driver: Any, base: str, key: str) -> None:
    driver.get(base + "/dashboard/ops/accounts")
    wait(driver, lambda d: d.find_elements(By.ID, "api_key"))
    screenshot(driver, "login")
    driver.find_element(By.ID, "api_key").send_keys(key)
    driver.find_element(By.CSS_SELECTOR, "#login button").click()
    wait(driver, lambda d: d.find_elements(By.ID, "accounts"))


def submit(driver: Any, form_selector: str) -> None:
    driver.find_element(By.CSS_SELECTOR, f"{form_selector} button[type=submit]").click()


def confirm(driver: Any, shot: str | None = None) -> None:
    wait(driver, lambda d: d.find_elements(By.ID, "confirm-button"))
    if shot:
        screenshot(driver, shot)
    driver.find_element(By.ID, "confirm-button").click()


def test_an_operator_signs_in_and_opens_every_page(browser: Any, api_server: ServerThread,
                                                   admin_key: str, settings: Settings,
                                                   worker: Worker) -> None:
    arrange(settings)
    base = api_server.url
    sign_in(browser, base, admin_key)
    screenshot(browser, "ops-accounts")
    browser.find_element(By.LINK_TEXT, "acme-42").click()
    wait(browser, lambda d: d.find_elements(By.ID, "account-id"))
    assert browser.find_element(By.ID, "account-id").text == "acme-42"
    assert "purchase-1" in browser.page_source and "refund-1" in browser.page_source
    screenshot(browser, "ops-account")

    browser.get(base + "/dashboard/ops/runs")
    Select(browser.find_element(By.CSS_SELECTOR, "#dry-run select[name=kind]")
           ).select_by_visible_text("monthly")
    submit(browser, "#dry-run")
    confirm(browser, "ops-confirm")
    wait(browser, lambda d: d.find_element(By.ID, "run-status").text == "completed")
    screenshot(browser, "ops-run")
    browser.get(base + "/dashboard/ops/runs")
    screenshot(browser, "ops-runs")

    browser.get(base + "/dashboard/ops/dead-letters")
    assert "late-1" in browser.page_source
    screenshot(browser, "ops-dead-letters")
    browser.get(base + "/dashboard/ops/conflicts")
    assert "order-9" in browser.page_source
    screenshot(browser, "ops-conflicts")

    browser.get(base + "/dashboard/ops/queue")
    wait(browser, lambda d: d.find_element(By.ID, "workers").get_attribute("data-loaded"))
    assert browser.find_elements(By.CSS_SELECTOR, "#workers tr.worker"), \
        browser.find_element(By.ID, "workers").text
    assert browser.find_elements(By.CSS_SELECTOR, "#events-chart svg rect")
    screenshot(browser, "ops-queue")

    browser.get(base + "/dashboard/ops/usage?days=7&user_id=acme-42")
    assert "gemini-pro" in browser.page_source and "gpt-4o" in browser.page_source
    assert browser.find_elements(By.CSS_SELECTOR, "#usage-chart svg polyline")
    screenshot(browser, "ops-usage")
    flower = browser.find_element(By.LINK_TEXT, "Flower ↗").get_attribute("href")
    assert flower.endswith(":5555/")


def test_an_operator_credits_an_account_and_retries_a_dead_letter(
        browser: Any, api_server: ServerThread, admin_key: str, settings: Settings,
        worker: Worker) -> None:
    arrange(settings)
    base = api_server.url
    sign_in(browser, base, admin_key)
    browser.get(base + "/dashboard/ops/account?user_id=free-2")
    form = browser.find_element(By.ID, "credit-form")
    form.find_element(By.NAME, "amount").send_keys("40")
    form.find_element(By.NAME, "reason").send_keys("goodwill")
    submit(browser, "#credit-form")
    confirm(browser)
    wait(browser, lambda d: d.find_elements(By.ID, "done-message"))
    assert "balance now 45" in browser.find_element(By.ID, "done-message").text
    screenshot(browser, "ops-credited")

    apply(settings, {"type": "open_account", "key": "open:late-user",
                     "user_id": "late-user"})
    browser.get(base + "/dashboard/ops/dead-letters")
    browser.find_element(By.CSS_SELECTOR, ".dead-letter button.retry").click()
    confirm(browser)
    wait(browser, lambda d: d.find_elements(By.ID, "notice"))
    with LedgerClient(settings) as client:
        assert client.result("late-1", timeout=30).status == "applied"
        assert client.balance("late-user").balance == 3
    browser.get(base + "/dashboard/ops/dead-letters")
    assert browser.find_elements(By.ID, "dlq-empty")


@pytest.fixture
def other_site(tmp_path: Path) -> Iterator[str]:
    """Another origin: a plain static server on its own port, like the app's site."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://localhost:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def badge_balance(driver: Any) -> str | None:
    return driver.find_element(By.ID, "badge").get_attribute("data-balance")


def test_a_user_follows_the_link_and_the_badge_follows_each_charge(
        browser: Any, api_server: ServerThread, db: Settings, worker: Worker,
        other_site: str, tmp_path: Path) -> None:
    settings = db
    arrange(settings)
    with session_scope(settings) as session:
        session.execute(Account.__table__.update().where(Account.user_id == "free-2")
                        .values(last_reset_on=utcnow().date().isoformat()))
    with LedgerClient(settings) as client:
        link = client.dashboard_link("free-2", base_url=api_server.url)
        browser.get(link.url)
        wait(browser, lambda d: badge_balance(d) == "5")
        assert browser.find_element(By.ID, "balance").text == "5"
        assert browser.find_element(By.ID, "project-status").text == "ready"
        screenshot(browser, "user-overview")
        key = client.charge("free-2", feature="project_creation")
        wait(browser, lambda d: badge_balance(d) == "4")
        assert client.result(key).status == "applied"
        browser.find_element(By.LINK_TEXT, "History").click()
        wait(browser, lambda d: d.find_elements(By.ID, "entries"))
        assert "Charge for project_creation" in browser.page_source
        screenshot(browser, "user-history")

        # The same badge in the app's own page, on another origin.
        (tmp_path / "app.html").write_text(
            '<!doctype html><html><head><meta charset="utf-8"><title>My app</title></head>'
            '<body style="margin:0;font:15px system-ui,sans-serif">'
            '<nav style="display:flex;gap:18px;align-items:center;padding:12px 20px;'
            'border-bottom:1px solid #ddd"><b>My app</b><span>Projects</span>'
            '<span>Settings</span><span style="margin-left:auto"></span>' +
            link.badge_html.replace("<tokenledger-balance ",
                                    '<tokenledger-balance id="badge" ') +
            "</nav><p style='padding:0 20px'>Your app's own page, on another origin.</p>"
            "</body></html>")
        browser.get(other_site + "/app.html")
        wait(browser, lambda d: badge_balance(d) == "4")
        client.charge("free-2", feature="project_creation")
        wait(browser, lambda d: badge_balance(d) == "3")
        screenshot(browser, "badge-embedded", height=110)
    browser.get("about:blank")  # close the streams before the next test
    time.sleep(0.1)
