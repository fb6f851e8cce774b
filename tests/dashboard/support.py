"""What the dashboard tests share: signing in, user links, a large account built in SQL,
and a real browser (Debian's chromium and chromedriver, driven by Selenium)."""

from __future__ import annotations

import html
import os
import re
import shutil
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from tests.support import ROOT, session_scope
from tokenledger import Settings
from tokenledger.apikeys.service import create_key
from tokenledger.dashboard.links import mint
from tokenledger.db.engine import get_engine
from tokenledger.timeutil import utcnow

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# Screenshots of every page the browser tests open: kept as the run's artifacts, and
# copied into the README's docs/screenshots with TOKENLEDGER_UPDATE_SCREENSHOTS=1.
SCREENSHOTS = Path(os.environ.get("TOKENLEDGER_SCREENSHOTS", ROOT / "build" / "screenshots"))
DOCS_SCREENSHOTS = ROOT / "docs" / "screenshots"


@pytest.fixture
def admin_key(db: Settings) -> str:
    """A fresh admin key (the ``db`` fixture empties api_keys before each test)."""
    with session_scope(db) as session:
        return create_key(session, "admin", "dashboard test").key


def hidden(page: str, name: str) -> str:
    """The value of a page's hidden input ``name``."""
    found = re.search(rf'name="{name}" value="([^"]*)"', page)
    assert found, f"no hidden {name} in the page"
    return html.unescape(found.group(1))


def sign_in(http: httpx.Client, key: str) -> str:
    """Sign ``http`` in through the login form; returns the session's CSRF token."""
    form = http.get("/dashboard/login")
    assert form.status_code == 200, form.text
    r = http.post("/dashboard/login", data={"api_key": key, "csrf": hidden(form.text, "csrf"),
                                             "next": "/dashboard/ops/accounts"})
    assert r.status_code == 303, r.text
    page = http.get("/dashboard/ops/accounts")
    assert page.status_code == 200, page.text
    return hidden(page.text, "csrf")


def user_path(settings: Settings, user_id: str, ttl: int = 900) -> str:
    """The path of a fresh user link to ``user_id``'s dashboard."""
    return "/dashboard/u/" + mint(settings, user_id, utcnow(), ttl).token


def server_ms(response: httpx.Response) -> float:
    """What the server says it spent on a page (its Server-Timing header)."""
    timing = response.headers["server-timing"]
    return float(timing.split("dur=")[1])

# One cycle of ten entries per wallet: (type, feature, amount, model). Every prefix of the
# cycle keeps the balance positive, and each cycle adds 7.
CYCLE = (
    ("CREDIT", None, 30, None),
    ("CHARGE", "project_creation", -1, None),
    ("CHARGE", "image_generation", -10, None),
    ("CHARGE", "text_generation", -7, "gemini-pro"),
    ("REFUND", None, 1, None),
    ("HOLD", "code_generation", -5, None),
    ("HOLD_RELEASE", "code_generation", 5, None),
    ("CHARGE", "code_generation", -3, "gpt-4o"),
    ("CHARGE", None, -2, None),
    ("CHARGE", "project_creation", -1, None),
)

_OPEN = text("""
WITH acct AS (
    INSERT INTO accounts (user_id, plan_code, timezone, created_at, last_renewal_at)
    VALUES (:user_id, 'Professional', 'Asia/Bangkok', :start, :start) RETURNING id
)
INSERT INTO wallets (account_id, wallet_type, balance, expires_at, is_active, created_at)
SELECT acct.id, t.wallet_type, 0, t.expires_at, true, :start
FROM acct, (VALUES ('STANDARD', NULL::timestamptz),
                   ('PREMIUM', CAST(:expires AS timestamptz))) AS t(wallet_type, expires_at)
""")

_ENTRIES = text("""
WITH cycle AS (
    SELECT * FROM unnest(CAST(:types AS text[]), CAST(:features AS text[]),
                         CAST(:amounts AS bigint[]), CAST(:models AS text[]))
                  WITH ORDINALITY AS c(type, feature, amount, model, pos)
), rows AS (
    SELECT g.i, w.id AS wallet_id, w.account_id, c.type, c.feature, c.amount, c.model,
           :start + (CAST(g.i AS bigint) * :step) * interval '1 microsecond' AS created_at
    FROM generate_series(1, :n) AS g(i)
    JOIN cycle AS c ON c.pos = ((g.i - 1) / 2) % 10 + 1
    JOIN wallets AS w ON w.wallet_type = CASE WHEN g.i % 2 = 0 THEN 'PREMIUM'
                                              ELSE 'STANDARD' END
    JOIN accounts AS a ON a.id = w.account_id AND a.user_id = :user_id
), entries AS (
    INSERT INTO ledger_entries (account_id, wallet_id, amount, balance_before, balance_after,
                                type, feature, event_key, reference, metadata, created_at)
    SELECT account_id, wallet_id, amount,
           sum(amount) OVER w - amount, sum(amount) OVER w, type, feature,
           :user_id || ':' || i,
           CASE WHEN type = 'REFUND' THEN :user_id || ':' || (i - 6) END,
           CASE WHEN model IS NOT NULL THEN jsonb_build_object(
               'model', model, 'input_tokens', 120, 'output_tokens', 640,
               'exact_cost', (-amount - 0.25)::text, 'provider_cost', '0.0031')
           END,
           created_at
    FROM rows WINDOW w AS (PARTITION BY wallet_id ORDER BY i)
    ORDER BY i  -- ids in time order, the wallets' entries interleaved, as in a real ledger
    RETURNING event_key, type, created_at
)
INSERT INTO event_outcomes (key, payload_hash, user_id, event_type, outcome, result, created_at)
SELECT event_key, md5(event_key), :user_id, lower(type), 'applied', '{}'::jsonb, created_at
FROM entries
""")

_BALANCES = text("""
UPDATE wallets SET balance = sums.total
FROM (SELECT e.wallet_id, sum(e.amount) AS total FROM ledger_entries AS e
      JOIN accounts AS a ON a.id = e.account_id AND a.user_id = :user_id
      GROUP BY e.wallet_id) AS sums
WHERE wallets.id = sums.wallet_id
""")


def seed_large_account(settings: Settings, user_id: str, entries: int = 100_000,
                       days: int = 90) -> None:
    """Open ``user_id`` (Professional, Asia/Bangkok) with a STANDARD and a PREMIUM wallet
    and ``entries`` ledger entries spread over the last ``days`` days (every wallet equal
    to the sum of its entries), and an outcome for each of its events."""
    now = utcnow()
    start = now - timedelta(days=days)
    step = int(timedelta(days=days).total_seconds() * 1_000_000 // (entries + 1))
    with session_scope(settings) as session:
        session.execute(_OPEN, {"user_id": user_id, "start": start,
                                "expires": now + timedelta(days=30)})
        session.execute(_ENTRIES, {
            "user_id": user_id, "start": start, "step": step, "n": entries,
            "types": [c[0] for c in CYCLE], "features": [c[1] for c in CYCLE],
            "amounts": [c[2] for c in CYCLE], "models": [c[3] for c in CYCLE]})
        session.execute(_BALANCES, {"user_id": user_id})
    # As a ledger at rest: statistics, visibility map and time ranges summarized (what
    # autovacuum does in the background after a bulk load).
    with get_engine(settings.ledger_url()).connect().execution_options(
            isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE accounts, wallets, ledger_entries, event_outcomes"))


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """Headless Chromium (Debian's package, no download) through its chromedriver."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        message = "chromium and chromium-driver are not installed (apt-get install -y " \
                  "chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager never downloads anything
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                 "--window-size=1280,900",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def screenshot(driver: object, name: str, height: int = 1600) -> Path:
    """Save the whole page (up to ``height`` px tall) as ``<name>.png`` among the
    artifacts, and in docs/screenshots with TOKENLEDGER_UPDATE_SCREENSHOTS=1."""
    import base64

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    size = driver.execute_cdp_cmd(  # type: ignore[attr-defined]
        "Page.getLayoutMetrics", {})["cssContentSize"]
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {  # type: ignore[attr-defined]
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": size["width"],
                 "height": min(size["height"], height), "scale": 1}})
    path = SCREENSHOTS / f"{name}.png"
    path.write_bytes(base64.b64decode(shot["data"]))
    if os.environ.get("TOKENLEDGER_UPDATE_SCREENSHOTS") == "1":
        DOCS_SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, DOCS_SCREENSHOTS / path.name)
    return path
