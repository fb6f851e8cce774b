"""Settings, read once from ``TOKENLEDGER_*`` environment variables at the edge.

With ``TOKENLEDGER_DATABASE_URL`` and ``TOKENLEDGER_BROKER_URL`` unset, tokenledger runs
on its embedded default: a private PostgreSQL and a private Redis in one data directory
(``TOKENLEDGER_HOME``), started on first use (``tokenledger.db.embedded``).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

POSTGRES_SCHEMES = ("postgres", "postgresql", "postgresql+psycopg")
BROKER_SCHEMES = ("redis", "rediss", "redis+socket", "amqp", "amqps", "pyamqp")


def _shown(url: str) -> str:
    from tokenledger.ops.logs import mask_url

    return mask_url(url) or ""


def default_home() -> Path:
    """Where the embedded servers keep their data: ``$XDG_DATA_HOME/tokenledger``, else
    ``~/.local/share/tokenledger`` (never the current directory)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "tokenledger"


class Settings(BaseSettings):
    """Everything tokenledger reads from its environment. Tests build it directly."""

    model_config = SettingsConfigDict(env_prefix="TOKENLEDGER_", extra="ignore")

    def __init__(self, **values: Any) -> None:
        # Built from the environment or by an SDK user: a bad value is a
        # ConfigurationError naming the field and its variable, never pydantic's own error.
        from pydantic import ValidationError

        from tokenledger.errors import ConfigurationError

        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ConfigurationError(_described(exc)) from exc

    database_url: str | None = Field(
        default=None,
        description="PostgreSQL URL of the ledger; unset: the embedded PostgreSQL.")
    broker_url: str | None = Field(
        default=None,
        description="Celery broker URL (Redis or RabbitMQ); unset: the embedded Redis.")
    home: Path = Field(default_factory=default_home,
                       description="Data directory of the embedded PostgreSQL and Redis.")
    timezone: str = "UTC"
    catalog: Path | None = None
    alert_webhook_url: str | None = None
    hold_ttl_seconds: int = Field(default=900, gt=0)
    alert_failure_ratio: float = Field(default=0.1, ge=0)
    # Transient-error retries must finish well inside the broker's visibility timeout,
    # or the broker redelivers a message that is merely waiting for its retry.
    visibility_timeout: int = Field(default=300, gt=0)
    retry_backoff_max: int = Field(default=30, gt=0)
    max_retries: int = Field(default=8, ge=0)
    # The ledger queue (events); every other task travels on ``<queue>.tasks``.
    queue: str = "tokenledger"
    # Renewal chunks go here when set, so dedicated workers can take them and live
    # charges never queue behind a million-account run; default: ``<queue>.tasks``.
    renewal_queue: str | None = None
    # Accounts per chunk task; each chunk still commits every renewal_slice_size accounts.
    renewal_chunk_size: int = Field(default=25_000, ge=1, le=100_000)
    # Accounts per renewal transaction: a live charge on an account of a slice in flight
    # waits for the slice's commit, so this bounds that wait.
    renewal_slice_size: int = Field(default=2000, ge=1, le=100_000)
    # PostgreSQL connections of the API's token-process start pool, per API process.
    # Starts that arrive while all are busy wait and then share one transaction.
    start_connections: int = Field(default=16, ge=1, le=256)
    worker_concurrency: int | None = None
    flower_basic_auth: str | None = None
    metrics_port: int | None = None
    log_json: bool = True
    log_level: str = "INFO"
    # Balance notifications (pub/sub). Default: the broker's Redis when the broker is Redis.
    notify_redis_url: str | None = None
    notify_channel_prefix: str = "tokenledger:"
    notify_enabled: bool = True
    # The key of the keyed hash that turns an erased user's id into its pseudonym
    # (`tokenledger accounts erase`): keep it secret and keep it, or the same user erased
    # again gets another pseudonym.
    erasure_secret: SecretStr | None = None
    # Retention (`tokenledger retention compact`): the beat job is off unless enabled.
    retention_enabled: bool = False
    retention_older_than: str = "400d"
    # Idempotency outcomes outlive the entries they produced by this many days, so a late
    # redelivery of a compacted event is still recognized as a duplicate.
    retention_key_grace_days: int = Field(default=30, ge=1, le=36_500)
    # Accounts per compaction transaction (each holds an advisory lock per account).
    retention_chunk_size: int = Field(default=500, ge=1, le=5_000)
    # Seconds to wait after each failed webhook delivery attempt (the Standard Webhooks
    # schedule, about 27.6 hours in all); after the last, the delivery is marked failed.
    webhook_retry_schedule: str = "5,300,1800,7200,18000,36000,36000"
    webhook_timeout_seconds: float = Field(default=10.0, gt=0, le=120)
    # The dashboard (``/dashboard``): user links and operator sessions are signed with keys
    # derived from this secret; unset, neither is served (an admin key still opens the
    # operator pages). Rotating it ends every link and session.
    dashboard_secret: SecretStr | None = None
    # The API's public base URL, for the links the SDK and the CLI mint (the HTTP route
    # uses the URL it was called at when this is unset).
    dashboard_url: str | None = None
    # Where operators find Flower (default: port 5555 of the host serving the dashboard).
    flower_url: str | None = None

    @field_validator("database_url")
    @classmethod
    def _postgres_url(cls, url: str | None) -> str | None:
        if url is None:
            return None
        url = url.strip()
        if not url:
            raise ValueError("is empty: unset it to use the embedded PostgreSQL, or give a "
                             "postgresql://user:password@host:5432/database URL")
        # Users paste libpq-style URLs; tokenledger speaks psycopg 3.
        scheme, sep, rest = url.partition("://")
        if not sep or not rest:
            raise ValueError(f"{_shown(url)!r} is not a URL: give postgresql://user:password"
                             "@host:5432/database")
        if scheme not in POSTGRES_SCHEMES:
            raise ValueError(f"scheme {scheme!r} is not supported: PostgreSQL is the only "
                             "ledger database (postgresql://...)")
        return "postgresql+psycopg://" + rest

    @field_validator("broker_url")
    @classmethod
    def _broker_url(cls, url: str | None) -> str | None:
        if url is None:
            return None
        url = url.strip()
        if not url:
            raise ValueError("is empty: unset it to use the embedded Redis, or give a "
                             "redis://host:6379/0 or amqp://user:password@host:5672// URL")
        scheme = url.partition("://")[0]
        if scheme not in BROKER_SCHEMES:
            raise ValueError(f"scheme {scheme!r} is not supported: use redis://, rediss://, "
                             "redis+socket://, amqp:// or amqps://")
        return url

    @field_validator("retention_older_than")
    @classmethod
    def _retention_age(cls, value: str) -> str:
        from tokenledger.timeutil import parse_age

        parse_age(value)
        return value

    @field_validator("webhook_retry_schedule")
    @classmethod
    def _retry_schedule(cls, value: str) -> str:
        parse_retry_schedule(value)
        return value

    def retry_delays(self) -> tuple[float, ...]:
        """Seconds to wait after each failed webhook attempt, in order."""
        return parse_retry_schedule(self.webhook_retry_schedule)
    @field_validator("dashboard_secret")
    @classmethod
    def _dashboard_secret(cls, secret: SecretStr | None) -> SecretStr | None:
        if secret is None or not secret.get_secret_value().strip():
            return None  # an empty variable (compose's ${VAR:-}) means unset
        if len(secret.get_secret_value()) < 16:
            raise ValueError("is too short: give at least 16 random characters, e.g. "
                             "python -c 'import secrets; print(secrets.token_urlsafe(32))'")
        return secret

    @field_validator("dashboard_url", "flower_url")
    @classmethod
    def _http_url(cls, url: str | None) -> str | None:
        if url is None or not url.strip():
            return None  # an empty variable means unset
        url = url.strip()
        if not url.startswith(("http://", "https://")) or len(url) > 2000:
            raise ValueError(f"{url[:100]!r} is not an http:// or https:// URL")
        return url

    @property
    def embedded_database(self) -> bool:
        return self.database_url is None

    @property
    def embedded_broker(self) -> bool:
        return self.broker_url is None

    def ledger_url(self) -> str:
        """The ledger database's URL; starts the embedded PostgreSQL when none is set."""
        if self.database_url is not None:
            return self.database_url
        from tokenledger.db import embedded

        return embedded.database_url(self.home, self.catalog)

    def broker(self) -> str:
        """The broker's URL; starts the embedded Redis when none is set."""
        if self.broker_url is not None:
            return self.broker_url
        from tokenledger.queue import embedded

        return embedded.redis_url(self.home)

    @property
    def tasks_queue(self) -> str:
        """The queue of every task but the ledger's events (renewals, sweeps, deferred
        refunds): ``<queue>.tasks``."""
        return f"{self.queue}.tasks"

    def backoff(self, attempt: int) -> int:
        """Seconds to wait before retry ``attempt`` (0-based): exponential, capped."""
        cap = min(self.retry_backoff_max, max(1, self.visibility_timeout // 4))
        return min(cap, 2**attempt)


def parse_retry_schedule(value: str) -> tuple[float, ...]:
    """``"5,300,1800"`` as seconds; a bad list raises ValueError naming the part."""
    delays = []
    for part in value.split(","):
        try:
            delay = float(part)
        except ValueError:
            raise ValueError(f"{part.strip()!r} is not a number of seconds") from None
        if not 0 < delay <= 7 * 86400:
            raise ValueError(f"{part.strip()!r}: each delay must be within (0, 604800] s")
        delays.append(delay)
    if not 1 <= len(delays) <= 30:
        raise ValueError("give between 1 and 30 comma-separated delays in seconds")
    return tuple(delays)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, built from the environment on first use."""
    return Settings()


def settings_from_env() -> Settings:
    """``get_settings()``: a bad variable raises ConfigurationError naming each one and its
    fix (the SDK and the CLI raise only tokenledger's own errors)."""
    return get_settings()


def _described(exc: Any) -> str:
    """A settings ValidationError as one line: each field with its variable and the fix."""
    return "; ".join(
        f"TOKENLEDGER_{'_'.join(str(p) for p in e['loc']).upper()}: "
        f"{str(e['msg']).removeprefix('Value error, ')}"
        for e in exc.errors(include_url=False))
