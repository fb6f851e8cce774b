"""User links: what a token grants, and the three ways an app makes one (the HTTP route,
the SDK and the CLI)."""

from __future__ import annotations

import json
from datetime import timedelta

import httpx
import pytest

from tests.api.support import ServerThread, api_server, auth, http, keys
from tests.dashboard.support import user_path
from tests.support import apply, run_cli
from tokenledger import LedgerClient, Settings
from tokenledger.dashboard.links import (
    DashboardDisabled,
    InvalidLink,
    b64,
    mint,
    unb64,
    verify,
)
from tokenledger.errors import AccountNotFound, ValidationFailed
from tokenledger.timeutil import utcnow

pytestmark = pytest.mark.services
__all__ = ["api_server", "http", "keys"]  # fixtures used by name


def open_account(settings: Settings, user_id: str, plan: str = "Free") -> None:
    apply(settings, {"type": "open_account", "key": f"open:{user_id}", "user_id": user_id,
                     "plan": plan})


def test_a_link_names_one_account_until_it_expires(settings: Settings) -> None:
    now = utcnow()
    link = mint(settings, "alice", now, ttl_seconds=60, base_url="https://tokens.example")
    assert link.url == f"https://tokens.example/dashboard/u/{link.token}"
    assert verify(settings, link.token, now).user_id == "alice"
    assert verify(settings, link.token, now + timedelta(seconds=59)).user_id == "alice"
    with pytest.raises(InvalidLink, match="expired"):
        verify(settings, link.token, now + timedelta(seconds=60))


def test_a_forged_or_altered_link_is_refused(settings: Settings) -> None:
    now = utcnow()
    token = mint(settings, "alice", now).token
    version, body, mac = token.split(".")
    # Another account in the payload, the signature kept.
    claims = json.loads(unb64(body))
    forged = f"{version}.{b64(json.dumps({**claims, 'u': 'bob'}).encode())}.{mac}"
    # A link signed under another secret.
    other = Settings(**{**settings.model_dump(), "dashboard_secret": "another-secret-0123456"})
    foreign = mint(other, "alice", now).token
    for bad in (forged, foreign, token[:-2], "v1.e30.AAAA", "", "v2." + token[3:],
                "x" * 5000):
        with pytest.raises(InvalidLink):
            verify(settings, bad, now)


def test_without_a_secret_no_link_is_minted_or_read(settings: Settings) -> None:
    off = Settings(**{**settings.model_dump(), "dashboard_secret": None})
    token = mint(settings, "alice", utcnow()).token
    with pytest.raises(DashboardDisabled, match="TOKENLEDGER_DASHBOARD_SECRET"):
        mint(off, "alice", utcnow())
    with pytest.raises(DashboardDisabled):
        verify(off, token, utcnow())


def test_a_links_lifetime_is_bounded(settings: Settings) -> None:
    for ttl in (0, 7 * 86400 + 1):
        with pytest.raises(ValidationFailed, match="ttl_seconds"):
            mint(settings, "alice", utcnow(), ttl)


def test_the_http_route_mints_a_link_for_reader_and_admin_keys_only(
        http: httpx.Client, keys: dict, settings: Settings) -> None:
    open_account(settings, "carol")
    body = {"user_id": "carol", "ttl_seconds": 120}
    for scope in ("reader", "admin"):
        r = http.post("/api/dashboard/links", json=body, headers=auth(keys[scope]))
        assert r.status_code == 201, r.text
        data = r.json()["data"]
        assert data["url"].startswith(str(http.base_url).rstrip("/") + "/dashboard/u/v1.")
        assert verify(settings, data["token"], utcnow()).user_id == "carol"
        assert 'src="' + data["url"] + '"' in data["badgeHtml"]
        page = http.get(data["url"])
        assert page.status_code == 200 and "carol" in page.text
    r = http.post("/api/dashboard/links", json=body, headers=auth(keys["producer"]))
    assert r.status_code == 403
    assert http.post("/api/dashboard/links", json=body).status_code == 401
    r = http.post("/api/dashboard/links", json={"user_id": "nobody"},
                  headers=auth(keys["reader"]))
    assert r.status_code == 404 and r.json()["message"] == "Account not found: nobody"
    r = http.post("/api/dashboard/links", json={"user_id": "carol", "ttl_seconds": 0},
                  headers=auth(keys["reader"]))
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "ttl_seconds"


def test_the_http_route_says_503_without_a_secret(settings: Settings, keys: dict) -> None:
    open_account(settings, "dave")
    off = Settings(**{**settings.model_dump(), "dashboard_secret": None})
    server = ServerThread(off).start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            r = client.post("/api/dashboard/links", json={"user_id": "dave"},
                            headers=auth(keys["reader"]))
            assert r.status_code == 503, r.text
            assert "TOKENLEDGER_DASHBOARD_SECRET" in r.json()["message"]
            # Its user pages refuse every link, saying why.
            page = client.get(user_path(settings, "dave"))
            assert page.status_code == 503 and "TOKENLEDGER_DASHBOARD_SECRET" in page.text
    finally:
        server.stop()


def test_the_sdk_mints_a_link_for_an_existing_account(client: LedgerClient,
                                                      settings: Settings) -> None:
    open_account(settings, "erin")
    link = client.dashboard_link("erin", ttl_seconds=300, base_url="https://t.example/")
    assert link.url.startswith("https://t.example/dashboard/u/")
    claims = verify(settings, link.token, utcnow())
    assert claims.user_id == "erin" and claims.expires_at == link.expires_at
    with pytest.raises(AccountNotFound):
        client.dashboard_link("nobody")


def test_the_cli_prints_a_link_and_the_badge_snippet(settings: Settings, db: Settings) -> None:
    open_account(settings, "frank")
    secret = settings.dashboard_secret.get_secret_value()
    result = run_cli(settings, "dashboard-link", "frank", "--ttl", "600", "--json",
                     TOKENLEDGER_DASHBOARD_SECRET=secret,
                     TOKENLEDGER_DASHBOARD_URL="https://tokens.example")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["url"].startswith("https://tokens.example/dashboard/u/")
    assert verify(settings, data["token"], utcnow()).user_id == "frank"
    assert "<tokenledger-balance" in data["badgeHtml"]
    plain = run_cli(settings, "dashboard-link", "frank", TOKENLEDGER_DASHBOARD_SECRET=secret)
    assert plain.exit_code == 0 and "http://127.0.0.1:8000/dashboard/u/v1." in plain.stdout
    off = run_cli(settings, "dashboard-link", "frank")
    assert off.exit_code == 2
    assert "TOKENLEDGER_DASHBOARD_SECRET" in off.stderr and "Traceback" not in off.stderr
    missing = run_cli(settings, "dashboard-link", "nobody", TOKENLEDGER_DASHBOARD_SECRET=secret)
    assert missing.exit_code == 2 and "nobody" in missing.stderr


def test_the_dashboard_settings_refuse_weak_secrets_and_odd_urls() -> None:
    from tokenledger.errors import ConfigurationError

    assert Settings(dashboard_secret="", dashboard_url="").dashboard_secret is None
    assert Settings(dashboard_url=" https://tokens.example ").dashboard_url == \
        "https://tokens.example"
    with pytest.raises(ConfigurationError, match="TOKENLEDGER_DASHBOARD_SECRET: is too short"):
        Settings(dashboard_secret="short")
    for name in ("dashboard_url", "flower_url"):
        with pytest.raises(ConfigurationError, match="not an http"):
            Settings(**{name: "javascript:alert(1)"})


def test_a_links_token_is_masked_in_the_logs(settings: Settings) -> None:
    from tokenledger.ops.logs import scrub

    token = mint(settings, "alice", utcnow()).token
    line = f'127.0.0.1:5 - "GET /dashboard/u/{token}/history?type=CHARGE HTTP/1.1" 200'
    assert scrub(line) == '127.0.0.1:5 - "GET /dashboard/u/***/history?type=CHARGE HTTP/1.1" 200'
