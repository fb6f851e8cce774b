"""Readiness checks for ``/readyz``, compose healthchecks and ``tokenledger status``."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import text

from tokenledger.config import Settings
from tokenledger.db.engine import get_engine
from tokenledger.ops.logs import mask_url, scrub


@dataclass(frozen=True)
class Check:
    """The result of one check; ``detail`` never contains a password."""

    name: str
    ok: bool
    detail: str
    latency_ms: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _timed(name: str, target: str | None, probe: Any) -> Check:
    started = time.perf_counter()
    try:
        probe()
    except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return Check(name, False, f"{mask_url(target)}: {scrub(first)}"[:500],
                     round((time.perf_counter() - started) * 1000, 2))
    return Check(name, True, mask_url(target) or "", round((time.perf_counter() - started)
                                                          * 1000, 2))


def check_database(settings: Settings) -> Check:
    """The ledger database answers ``SELECT 1``."""

    def probe() -> None:
        with get_engine(settings.ledger_url()).connect() as conn:
            conn.execute(text("SELECT 1"))

    return _timed("database", settings.database_url or "embedded PostgreSQL", probe)


def check_broker(settings: Settings, timeout: float = 2.0) -> Check:
    """The broker accepts a connection: Redis answers PING, RabbitMQ a connection."""
    from tokenledger.queue.config import is_redis, redis_client

    url = settings.broker_url or "embedded Redis"

    def probe() -> None:
        broker = settings.broker()
        if is_redis(broker):
            client = redis_client(broker, timeout)
            try:
                client.ping()
            finally:
                client.close()
        else:
            from kombu import Connection

            with Connection(broker, connect_timeout=timeout) as conn:
                conn.ensure_connection(max_retries=1, timeout=timeout)

    return _timed("broker", url, probe)


def readiness(settings: Settings) -> tuple[bool, list[Check]]:
    """Both checks; ready only when every one passed."""
    checks = [check_database(settings), check_broker(settings)]
    return all(c.ok for c in checks), checks
