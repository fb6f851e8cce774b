"""Creating, listing, revoking and checking API keys.

A key reads ``tl_<prefix>_<secret>``: the prefix (public, unique) finds the row, the
SHA-256 of the whole key is what is stored, and the comparison is constant-time. The
secret has 256 bits of entropy, so a plain SHA-256 is enough (no password stretching).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from tokenledger.apikeys.models import SCOPES, ApiKey
from tokenledger.errors import ValidationFailed
from tokenledger.timeutil import as_utc, utcnow

_KEY_RE = re.compile(r"^tl_([a-z0-9]{12})_([A-Za-z0-9_-]{43})$")
MAX_KEY_LENGTH = 128


@dataclass(frozen=True, slots=True)
class KeyInfo:
    id: int
    prefix: str
    scope: str
    name: str | None
    created_at: datetime | None
    revoked_at: datetime | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


@dataclass(frozen=True, slots=True)
class CreatedKey:
    info: KeyInfo
    key: str  # the only time the full key exists outside its holder


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _info(row: ApiKey) -> KeyInfo:
    return KeyInfo(row.id, row.prefix, row.scope, row.name, as_utc(row.created_at),
                   as_utc(row.revoked_at))


def create_key(session: Session, scope: str, name: str | None = None) -> CreatedKey:
    """Store a new key's hash and return the key itself (it cannot be shown again)."""
    if scope not in SCOPES:
        raise ValidationFailed(f"scope: must be one of {', '.join(SCOPES)}")
    if name is not None and len(name) > 128:
        raise ValidationFailed("name: at most 128 characters")
    prefix = "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(12))
    key = f"tl_{prefix}_{secrets.token_urlsafe(32)}"
    row = ApiKey(prefix=prefix, secret_hash=_digest(key), scope=scope, name=name,
                 created_at=utcnow())
    session.add(row)
    session.flush()
    return CreatedKey(_info(row), key)


def list_keys(session: Session, include_revoked: bool = True) -> list[KeyInfo]:
    """Every key's public part, oldest first."""
    query = select(ApiKey).order_by(ApiKey.id)
    if not include_revoked:
        query = query.where(ApiKey.revoked_at.is_(None))
    return [_info(r) for r in session.scalars(query)]


def revoke_key(session: Session, prefix_or_id: str) -> KeyInfo | None:
    """Revoke a key by its prefix (or numeric id); None when no such key. Safe to run twice."""
    ident = prefix_or_id.strip()
    if ident.startswith("tl_"):
        match = _KEY_RE.match(ident)
        ident = match.group(1) if match else ident[3:].split("_", 1)[0]
    cond = ApiKey.id == int(ident) if ident.isdigit() else ApiKey.prefix == ident
    row = session.scalar(select(ApiKey).where(cond))
    if row is None:
        return None
    if row.revoked_at is None:
        session.execute(update(ApiKey).where(ApiKey.id == row.id).values(revoked_at=utcnow()))
        session.refresh(row)
    return _info(row)


def authenticate(session: Session, key: str | None) -> KeyInfo | None:
    """The active key matching ``key`` exactly, or None. Constant-time on the secret."""
    if not key or len(key) > MAX_KEY_LENGTH:
        return None
    match = _KEY_RE.match(key)
    if match is None:
        return None
    row = session.scalar(select(ApiKey).where(ApiKey.prefix == match.group(1)))
    if row is None or not hmac.compare_digest(row.secret_hash, _digest(key)):
        return None
    if row.revoked_at is not None:
        return None
    return _info(row)


class KeyCache:
    """Recent authentication answers, per process, for ``ttl`` seconds.

    A revoked key stops working within ``ttl``; answers are keyed by the key's digest, so
    the cache never holds a key itself. An answer in the last quarter of its life is
    still served, and the first request to see it there is told to look the key up again
    (:meth:`lookup`): a key in steady use is re-read before it expires instead of every
    request of that moment missing at once and looking it up.
    """

    def __init__(self, ttl: float = 2.0, max_entries: int = 10_000) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: dict[str, tuple[float, KeyInfo | None]] = {}
        self._refreshing: set[str] = set()
        self._lock = threading.Lock()

    def lookup(self, key: str) -> tuple[bool, KeyInfo | None, bool]:
        """(hit, answer, refresh): with ``refresh`` the caller should look the key up
        and :meth:`put` the answer (or :meth:`put_failed`); told once per answer."""
        digest = _digest(key)
        entry = self._entries.get(digest)
        if entry is None:
            return False, None, False
        left = entry[0] - time.monotonic()
        if left <= 0:
            return False, None, False
        if left > self.ttl / 4 or digest in self._refreshing:
            return True, entry[1], False
        with self._lock:
            if digest in self._refreshing:
                return True, entry[1], False
            self._refreshing.add(digest)
        return True, entry[1], True

    def put(self, key: str, info: KeyInfo | None) -> None:
        if self.ttl <= 0:
            return
        digest = _digest(key)
        with self._lock:
            if len(self._entries) >= self.max_entries:
                self._entries.clear()
            self._entries[digest] = (time.monotonic() + self.ttl, info)
            self._refreshing.discard(digest)

    def put_failed(self, key: str) -> None:
        """A refresh that could not look the key up: the next request may try again."""
        with self._lock:
            self._refreshing.discard(_digest(key))

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._refreshing.clear()
