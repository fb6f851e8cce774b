"""Who may see the operator pages: an admin key, in the ``x-server-api-key`` header or
exchanged at the login form for a session cookie; and the CSRF tokens of their forms.

A session cookie names the admin key it was opened with (its public prefix), an expiry
and a random nonce, signed with a key derived from the dashboard secret *and* that API
key's stored hash: revoking the key, or rotating the secret, ends its sessions. Every
form carries a CSRF token derived from the session's nonce; a request authenticated by
the header (which a browser never sends by itself) needs none. The login form has its
own token, bound to a nonce cookie (double submit), so a page elsewhere cannot sign a
browser in.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session

from tokenledger.apikeys.models import ApiKey
from tokenledger.apikeys.service import authenticate
from tokenledger.dashboard.links import b64, derived_key, sign, unb64, unsign
from tokenledger.errors import TokenLedgerError

if TYPE_CHECKING:
    from tokenledger.config import Settings

SESSION_COOKIE = "tl_operator"
LOGIN_COOKIE = "tl_login"
SESSION_SECONDS = 8 * 3600
HEADER = "x-server-api-key"


class NotAdmin(TokenLedgerError):
    """A valid API key whose scope is not ``admin``."""


@dataclass(frozen=True, slots=True)
class Operator:
    """An admin signed in: by session (with the CSRF token its forms carry) or by header."""

    key_prefix: str
    key_name: str | None
    csrf: str | None

    @property
    def by_header(self) -> bool:
        """Signed in by the header: no session, no CSRF token (none is needed)."""
        return self.csrf is None


def _session_key(settings: Settings, row: ApiKey) -> bytes:
    return hmac.new(derived_key(settings, "operator-session"), row.secret_hash.encode(),
                    hashlib.sha256).digest()


def _csrf(key: bytes, nonce: str) -> str:
    return b64(hmac.new(key, f"csrf {nonce}".encode(), hashlib.sha256).digest())


def _admin_row(session: Session, prefix: str) -> ApiKey | None:
    row = session.scalar(select(ApiKey).where(ApiKey.prefix == prefix))
    if row is None or row.revoked_at is not None or row.scope != "admin":
        return None
    return row


def open_session(settings: Settings, session: Session, api_key: str,
                 now: datetime) -> tuple[str, Operator]:
    """Exchange an admin key for a session cookie's value (valid SESSION_SECONDS; none of
    the key is kept in it). Raises TokenLedgerError for an invalid key, NotAdmin for a key
    of another scope."""
    info = authenticate(session, api_key.strip())
    if info is None:
        raise TokenLedgerError("Invalid server API key")
    if info.scope != "admin":
        raise NotAdmin(f"this key's scope ({info.scope}) cannot open the operator pages; "
                       "use an admin key")
    row = _admin_row(session, info.prefix)
    assert row is not None
    key = _session_key(settings, row)
    nonce = secrets.token_urlsafe(16)
    cookie = sign(key, {"k": row.prefix, "exp": int(now.timestamp()) + SESSION_SECONDS,
                        "n": nonce})
    return cookie, Operator(row.prefix, row.name, _csrf(key, nonce))


def from_cookie(settings: Settings, session: Session, cookie: str | None,
                now: datetime) -> Operator | None:
    """The operator a session cookie names, if it is ours, unexpired and its key is still
    an active admin key; else None."""
    if not cookie or settings.dashboard_secret is None:
        return None
    parts = cookie.split(".")
    if len(parts) != 3:
        return None
    try:
        claimed = json.loads(unb64(parts[1]))
    except (ValueError, TypeError):
        return None
    prefix = claimed.get("k") if isinstance(claimed, dict) else None
    if not isinstance(prefix, str) or len(prefix) > 16:
        return None
    row = _admin_row(session, prefix)
    if row is None:
        return None
    key = _session_key(settings, row)
    payload = unsign(key, cookie)
    if payload is None:
        return None
    expires, nonce = payload.get("exp"), payload.get("n")
    if not isinstance(expires, int) or not isinstance(nonce, str) \
            or expires <= now.timestamp():
        return None
    return Operator(row.prefix, row.name, _csrf(key, nonce))


def from_header(session: Session, api_key: str) -> Operator:
    """The operator an admin key names; raises for an invalid key or another scope."""
    info = authenticate(session, api_key)
    if info is None:
        raise TokenLedgerError("Invalid server API key")
    if info.scope != "admin":
        raise NotAdmin(f"this key's scope ({info.scope}) cannot open the operator pages; "
                       "use an admin key")
    return Operator(info.prefix, info.name, None)


def csrf_ok(operator: Operator, token: str | None) -> bool:
    """Whether a form's CSRF token is this session's (always, for header callers)."""
    if operator.csrf is None:
        return True
    return bool(token) and hmac.compare_digest(operator.csrf.encode(), token.encode())


def login_nonce() -> str:
    """A fresh nonce for the login form's cookie."""
    return secrets.token_urlsafe(16)


def login_token(settings: Settings, nonce: str) -> str:
    """The login form's CSRF token for the nonce in its cookie."""
    return b64(hmac.new(derived_key(settings, "login-form"), nonce.encode(),
                        hashlib.sha256).digest())


def login_token_ok(settings: Settings, nonce: str | None, token: str | None) -> bool:
    """Whether a login form's token is the one for the nonce in its cookie."""
    if not nonce or not token or len(nonce) > 64:
        return False
    return hmac.compare_digest(login_token(settings, nonce).encode(), token.encode())
