"""Settings, read once from ``TOKENLEDGER_*`` environment variables at the edge."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

EMBEDDED_BROKER_PREFIX = "sqla+"


class Settings(BaseSettings):
    """Everything tokenledger reads from its environment. Tests build it directly."""

    model_config = SettingsConfigDict(env_prefix="TOKENLEDGER_", extra="ignore")

    database_url: str = Field(
        default_factory=lambda: f"sqlite:///{Path.cwd() / 'tokenledger.sqlite'}",
        description="SQLAlchemy URL of the ledger database (PostgreSQL in production).",
    )
    broker_url: str = Field(
        default_factory=lambda: f"sqla+sqlite:///{Path.cwd() / 'tokenledger-broker.sqlite'}",
        description="Celery broker URL; the default is an embedded broker on a local file.",
    )
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
    queue: str = "tokenledger"
    # Renewal chunks go here when set, so dedicated workers can take them and live
    # charges never queue behind a million-account run; default: the main queue.
    renewal_queue: str | None = None
    # Accounts per chunk task; each chunk still commits every renewal_slice_size accounts.
    renewal_chunk_size: int = Field(default=25_000, ge=1, le=100_000)
    # Accounts per renewal transaction: a live charge on an account of a slice in flight
    # waits for the slice's commit, so this bounds that wait (~20 us of work per account).
    renewal_slice_size: int = Field(default=2000, ge=1, le=100_000)
    # PostgreSQL connections of the API's token-process start pool, per API process.
    # Starts that arrive while all are busy wait and then share one transaction.
    start_connections: int = Field(default=16, ge=1, le=256)
    worker_concurrency: int | None = None
    flower_basic_auth: str | None = None
    metrics_port: int | None = None
    log_json: bool = True
    log_level: str = "INFO"
    # Balance notifications (pub/sub). Default: the broker's Redis when the broker is Redis;
    # with the embedded broker only in-process subscribers are told.
    notify_redis_url: str | None = None
    notify_channel_prefix: str = "tokenledger:"
    notify_enabled: bool = True

    @field_validator("database_url")
    @classmethod
    def _normalise_postgres_driver(cls, url: str) -> str:
        # Users paste libpq-style URLs; tokenledger speaks psycopg 3.
        for prefix in ("postgres://", "postgresql://"):
            if url.startswith(prefix):
                return "postgresql+psycopg://" + url[len(prefix):]
        return url

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def embedded_broker(self) -> bool:
        return self.broker_url.startswith(EMBEDDED_BROKER_PREFIX)

    def backoff(self, attempt: int) -> int:
        """Seconds to wait before retry ``attempt`` (0-based): exponential, capped."""
        cap = min(self.retry_backoff_max, max(1, self.visibility_timeout // 4))
        return min(cap, 2**attempt)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, built from the environment on first use."""
    return Settings()
