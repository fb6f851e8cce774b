"""Signed links to one account's dashboard: minted by the app's server, read by its user.

A link's token names one account and an expiry, signed with HMAC-SHA256 under a key
derived from ``TOKENLEDGER_DASHBOARD_SECRET`` (never the secret itself; each use of the
secret has its own derived key). Whoever holds a token may read that account's pages
until it expires, and nothing else: the pages take no user id from anywhere but the
token. Rotating the secret ends every link at once.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from html import escape
from typing import TYPE_CHECKING

from tokenledger.errors import TokenLedgerError, ValidationFailed

if TYPE_CHECKING:
    from tokenledger.config import Settings

VERSION = "v1"
DEFAULT_TTL = 900
MAX_TTL = 7 * 86400
LOCAL_URL = "http://127.0.0.1:8000"


class DashboardDisabled(TokenLedgerError):
    """Signed links and sessions need TOKENLEDGER_DASHBOARD_SECRET, which is unset."""

    def __init__(self) -> None:
        super().__init__("dashboard links and sign-in are off: set "
                         "TOKENLEDGER_DASHBOARD_SECRET (16+ random characters) on the API "
                         "and wherever links are minted")


class InvalidLink(TokenLedgerError):
    """A user link that is malformed, forged or expired."""


@dataclass(frozen=True, slots=True)
class DashboardLink:
    """A minted link: the token, the page's URL and when it stops working."""

    user_id: str
    token: str
    url: str
    expires_at: datetime

    @property
    def badge_html(self) -> str:
        """The snippet an app drops into its page for the live balance badge."""
        base = escape(self.url.split("/dashboard/u/", 1)[0])
        return (f'<script src="{base}/dashboard/static/badge.js" defer></script>\n'
                f'<tokenledger-balance src="{escape(self.url)}"></tokenledger-balance>')

    def as_dict(self) -> dict[str, str]:
        """JSON-ready, in the API's field names."""
        return {"userId": self.user_id, "url": self.url, "token": self.token,
                "expiresAt": self.expires_at.isoformat(), "badgeHtml": self.badge_html}


def derived_key(settings: Settings, purpose: str) -> bytes:
    """The key for one ``purpose`` (``user-link``, ``operator-session``, ...), derived from
    the dashboard secret; raises DashboardDisabled without one."""
    secret = settings.dashboard_secret
    if secret is None:
        raise DashboardDisabled()
    return hmac.new(secret.get_secret_value().encode(),
                    f"tokenledger dashboard {purpose}".encode(), hashlib.sha256).digest()


def b64(data: bytes) -> str:
    """URL-safe base64 without padding."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    """The inverse of :func:`b64` (ValueError on bad input)."""
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign(key: bytes, payload: dict[str, object]) -> str:
    """``v1.<payload>.<mac>``: a compact JSON payload and its HMAC-SHA256, base64url."""
    body = b64(json.dumps(payload, separators=(",", ":")).encode())
    mac = hmac.new(key, f"{VERSION}.{body}".encode(), hashlib.sha256).digest()
    return f"{VERSION}.{body}.{b64(mac)}"


def unsign(key: bytes, token: str) -> dict[str, object] | None:
    """The payload of a token signed with ``key``, or None (compared in constant time)."""
    if len(token) > 2048:
        return None
    version, _, rest = token.partition(".")
    body, _, mac = rest.partition(".")
    if version != VERSION or not body or not mac:
        return None
    expected = hmac.new(key, f"{VERSION}.{body}".encode(), hashlib.sha256).digest()
    try:
        if not hmac.compare_digest(unb64(mac), expected):
            return None
        payload = json.loads(unb64(body))
    except (ValueError, TypeError):
        return None
    return payload if isinstance(payload, dict) else None


def user_path(token: str) -> str:
    """The path of the user pages a token opens."""
    return f"/dashboard/u/{token}"


def mint(settings: Settings, user_id: str, now: datetime, ttl_seconds: int = DEFAULT_TTL,
         base_url: str | None = None) -> DashboardLink:
    """A link to ``user_id``'s dashboard that works for ``ttl_seconds`` (1 s to 7 days).
    Does not check that the account exists (callers do, in their unit of work)."""
    if not 1 <= ttl_seconds <= MAX_TTL:
        raise ValidationFailed(f"ttl_seconds: must be between 1 and {MAX_TTL}")
    if not user_id or len(user_id) > 128:
        raise ValidationFailed("user_id: must be 1 to 128 characters")
    expires = int(now.timestamp()) + ttl_seconds
    token = sign(derived_key(settings, "user-link"), {"u": user_id, "exp": expires})
    base = (base_url or settings.dashboard_url or LOCAL_URL).rstrip("/")
    return DashboardLink(user_id, token, base + user_path(token),
                         datetime.fromtimestamp(expires, UTC))


@dataclass(frozen=True, slots=True)
class LinkClaims:
    """What a valid token grants: read access to ``user_id`` until ``expires_at``."""

    user_id: str
    expires_at: datetime

    def seconds_left(self, now: datetime) -> float:
        """How long the link still works after ``now`` (negative once expired)."""
        return (self.expires_at - now).total_seconds()


def verify(settings: Settings, token: str, now: datetime) -> LinkClaims:
    """The account a user link names, if its signature is ours and it has not expired;
    raises InvalidLink otherwise (DashboardDisabled without a secret)."""
    payload = unsign(derived_key(settings, "user-link"), token)
    if payload is None:
        raise InvalidLink("this dashboard link is not valid")
    user_id, expires = payload.get("u"), payload.get("exp")
    if not isinstance(user_id, str) or not isinstance(expires, int) \
            or isinstance(expires, bool):
        raise InvalidLink("this dashboard link is not valid")
    expires_at = datetime.fromtimestamp(expires, UTC)
    if expires_at <= now:
        raise InvalidLink("this dashboard link has expired: open the dashboard again "
                          "from your app")
    return LinkClaims(user_id, expires_at)

