"""Prometheus metrics: what workers count as they apply events, and what is read from the
database and the broker when someone scrapes.

Workers count in the process that runs the task. Celery's prefork pool runs tasks in child
processes, so workers use prometheus-client's *multiprocess mode*: each child writes its
samples to files in ``PROMETHEUS_MULTIPROC_DIR`` and the worker's main process serves the
sum on ``TOKENLEDGER_METRICS_PORT`` (one port per worker node, see ``workers/celery_app``).
The API serves ``/metrics`` with :func:`render`, which adds the scrape-time gauges (DLQ
depth, queue backlog, holds open, renewal runs) read from PostgreSQL and the broker. Each
family name is exposed once (a scrape with two families of one name is invalid).

Label values are bounded: ``feature`` is a catalog feature or ``other``; ``type`` is one of
the event types or ``invalid``; ``outcome`` one of the fixed outcomes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client import values as _values
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, inspect, select, text

from tokenledger.config import Settings
from tokenledger.db.engine import get_engine
from tokenledger.queue.models import DeadLetter

log = logging.getLogger("tokenledger.metrics")

# A worker sets PROMETHEUS_MULTIPROC_DIR at start-up, possibly after something imported
# prometheus_client; the metrics below must write to that directory all the same.
_values.ValueClass = _values.get_value_class()

EVENT_TYPES = frozenset({"open_account", "charge", "credit", "refund", "token_process_end"})
OUTCOMES = ("applied", "duplicate", "declined", "rejected", "conflict", "dead_lettered",
            "deferred")

EVENTS = Counter(
    "tokenledger_events", "Events handled by workers, by outcome, event type and feature.",
    ["outcome", "type", "feature"])
BATCH_SIZE = Histogram(
    "tokenledger_apply_batch_size", "Events per message applied in one unit of work.",
    buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000))
APPLY_SECONDS = Histogram(
    "tokenledger_apply_duration_seconds",
    "Wall time of one apply_events task: validation, unit of work and commit.",
    buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
LATENCY = Histogram(
    "tokenledger_publish_to_commit_seconds",
    "From the producer publishing a message (its published_at header) to the commit of the "
    "unit of work that applied it.",
    buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300))
CHARGED = Counter(
    "tokenledger_credits_charged", "Credits charged by applied events, by feature.",
    ["feature"])
GRANTED = Counter(
    "tokenledger_credits_granted",
    "Credits added by applied events, by source (credit, refund, open).", ["source"])
RETRIES = Counter(
    "tokenledger_task_retries", "Task attempts that failed transiently and were retried.",
    ["task"])
START_GROUP_SIZE = Histogram(
    "tokenledger_start_group_size",
    "Token-process starts the API's start pool ran together in one transaction.",
    buckets=(1, 2, 4, 8, 16, 32))
NOTIFICATIONS = Counter(
    "tokenledger_notifications", "Balance notices published after commit.", ["event"])
NOTIFY_ERRORS = Counter(
    "tokenledger_notification_errors", "Balance notice batches that could not be published.")


def feature_label(feature: str | None, known: Iterable[str]) -> str:
    """A bounded label: the catalog feature, ``none`` when absent, ``other`` otherwise."""
    if not feature:
        return "none"
    return feature if feature in known else "other"


def record_batch(events: Sequence[Any], results: Sequence[Any], features: Iterable[str],
                 invalid: int = 0, seconds: float | None = None,
                 published_at: float | None = None) -> None:
    """Count one committed message: call it only after the unit of work committed."""
    known = frozenset(features)
    for event, result in zip(events, results, strict=False):
        feature = feature_label(getattr(event, "feature", None)
                                or getattr(event, "feature_endpoint_id", None), known)
        EVENTS.labels(outcome=result.status, type=event.type, feature=feature).inc()
        if result.status != "applied":
            continue
        data = result.data or {}
        charged = data.get("charged", data.get("cost"))
        if event.type in ("charge", "token_process_end") and isinstance(charged, int) \
                and charged > 0:
            CHARGED.labels(feature=feature).inc(charged)
        elif event.type == "credit" and isinstance(data.get("credited"), int):
            GRANTED.labels(source="credit").inc(data["credited"])
        elif event.type == "refund" and isinstance(data.get("refunded"), int):
            GRANTED.labels(source="refund").inc(data["refunded"])
        elif event.type == "open_account" and isinstance(data.get("balance"), int) \
                and data["balance"] > 0:
            GRANTED.labels(source="open").inc(data["balance"])
    if invalid:
        EVENTS.labels(outcome="dead_lettered", type="invalid", feature="other").inc(invalid)
    BATCH_SIZE.observe(len(events) + invalid)
    if seconds is not None:
        APPLY_SECONDS.observe(seconds)
    if published_at is not None:
        LATENCY.observe(max(0.0, time.time() - published_at))


def record_dead_letter(payload: Any) -> None:
    """Count events sent to the dead-letter store by the base task (after commit)."""
    items = payload if isinstance(payload, list) else [payload]
    for item in items:
        kind = item.get("type") if isinstance(item, dict) else None
        EVENTS.labels(outcome="dead_lettered",
                      type=kind if kind in EVENT_TYPES else "invalid", feature="other").inc()


# -- scrape-time gauges --------------------------------------------------------------------

# kombu's Redis transport keeps priority levels in sibling lists named <queue>\x06\x16<n>.
_PRIORITY_SEP = "\x06\x16"
_PRIORITY_STEPS = (3, 6, 9)


def queue_depths(settings: Settings, queues: Iterable[str] | None = None) -> dict[str, int]:
    """Messages waiting (not yet delivered) in each queue of the configured broker."""
    from tokenledger.queue.config import is_redis, redis_client

    names = sorted(set(queues or ()) | {settings.queue, settings.tasks_queue})
    broker = settings.broker()
    if is_redis(broker):
        client = redis_client(broker)
        try:
            pipe = client.pipeline(transaction=False)
            for name in names:
                pipe.llen(name)
                for step in _PRIORITY_STEPS:
                    pipe.llen(f"{name}{_PRIORITY_SEP}{step}")
            counts = pipe.execute()
        finally:
            client.close()
        per = 1 + len(_PRIORITY_STEPS)
        return {name: sum(counts[i * per:(i + 1) * per]) for i, name in enumerate(names)}
    from kombu import Connection

    depths = {}
    with Connection(broker, connect_timeout=2) as conn:
        for name in names:
            # A passive declare of a queue that does not exist closes its channel: one
            # channel per queue.
            channel = conn.channel()
            try:
                depths[name] = int(channel.queue_declare(name, passive=True).message_count)
            except conn.channel_errors:
                depths[name] = 0  # not declared yet: nothing waits in it
            finally:
                with contextlib.suppress(Exception):
                    channel.close()
    return depths


def unacked(settings: Settings) -> int | None:
    """Messages delivered to workers and not yet acknowledged (Redis broker only)."""
    from tokenledger.queue.config import is_redis, redis_client

    broker = settings.broker()
    if not is_redis(broker):
        return None
    client = redis_client(broker)
    try:
        return int(client.hlen("unacked"))
    finally:
        client.close()


def dlq_depth(settings: Settings) -> int:
    """Messages in the dead-letter store."""
    with get_engine(settings.ledger_url()).connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(DeadLetter)) or 0)


_tables: dict[str, tuple[float, dict[str, set[str]]]] = {}
_tables_lock = threading.Lock()


def optional_tables(settings: Settings, ttl: float = 60) -> dict[str, set[str]]:
    """Tables (and their columns) of other parts that a database may not have yet."""
    with _tables_lock:
        cached = _tables.get(settings.ledger_url())
        if cached and time.monotonic() - cached[0] < ttl:
            return cached[1]
    found: dict[str, set[str]] = {}
    with get_engine(settings.ledger_url()).connect() as conn:
        insp = inspect(conn)
        for name in ("holds", "renewal_runs"):
            if insp.has_table(name):
                found[name] = {c["name"] for c in insp.get_columns(name)}
    with _tables_lock:
        _tables[settings.ledger_url()] = (time.monotonic(), found)
    return found


def holds_open(settings: Settings) -> int | None:
    """Token-process holds still open; None until the holds table is migrated."""
    if "holds" not in optional_tables(settings):
        return None
    with get_engine(settings.ledger_url()).connect() as conn:
        return int(conn.scalar(text("SELECT count(*) FROM holds WHERE status = 'open'")) or 0)


def renewal_runs(settings: Settings) -> list[dict[str, Any]] | None:
    """Per (kind, status): recorded runs and accounts failed; None until migrated."""
    if "renewal_runs" not in optional_tables(settings):
        return None
    with get_engine(settings.ledger_url()).connect() as conn:
        return [{"kind": r[0], "status": r[1], "runs": int(r[2]), "failed": int(r[3])}
                for r in conn.execute(text(
                    "SELECT kind, status, count(*), coalesce(sum(failed), 0) "
                    "FROM renewal_runs GROUP BY kind, status ORDER BY kind, status"))]


class StateCollector(Collector):
    """Gauges read at scrape time from the database and the broker. A source that cannot be
    read is reported through ``tokenledger_scrape_error`` instead of failing the scrape."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def collect(self) -> Iterator[Metric]:
        errors = GaugeMetricFamily("tokenledger_scrape_error",
                                   "1 when a scrape-time source could not be read.",
                                   labels=["source"])
        for source, produce in (("dlq", self._dlq), ("broker", self._queues),
                                ("holds", self._holds), ("renewals", self._renewals)):
            try:
                metrics = list(produce())
            except Exception as exc:  # noqa: BLE001 - a scrape must not 500
                log.warning("metrics source %s failed: %s", source, exc)
                errors.add_metric([source], 1)
                continue
            errors.add_metric([source], 0)
            yield from metrics
        yield errors

    def _dlq(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("tokenledger_dlq_depth", "Messages in the dead-letter store.",
                                value=dlq_depth(self.settings))

    def _queues(self) -> Iterator[Metric]:
        backlog = GaugeMetricFamily("tokenledger_queue_backlog",
                                    "Messages waiting in the broker, per queue.",
                                    labels=["queue"])
        for name, depth in queue_depths(self.settings).items():
            backlog.add_metric([name], depth)
        yield backlog
        pending = unacked(self.settings)
        if pending is not None:
            yield GaugeMetricFamily("tokenledger_queue_unacked",
                                    "Messages delivered to workers and not yet acknowledged.",
                                    value=pending)

    def _holds(self) -> Iterator[Metric]:
        count = holds_open(self.settings)
        if count is not None:
            yield GaugeMetricFamily("tokenledger_holds_open",
                                    "Token-process holds not yet settled or released.",
                                    value=count)

    def _renewals(self) -> Iterator[Metric]:
        rows = renewal_runs(self.settings)
        if rows is None:
            return
        # Not ``tokenledger_renewal_runs``: that family is the finishing process's counter
        # (renewals.alerts.RUNS); one name may hold one family only.
        runs = GaugeMetricFamily("tokenledger_renewal_runs_recorded",
                                 "Renewal/reset runs recorded in the database, by kind and "
                                 "status.", labels=["kind", "status"])
        failed = CounterMetricFamily("tokenledger_renewal_account_failures",
                                     "Accounts that failed in recorded runs, by kind.",
                                     labels=["kind"])
        failures: dict[str, int] = {}
        for row in rows:
            runs.add_metric([row["kind"], row["status"]], row["runs"])
            failures[row["kind"]] = failures.get(row["kind"], 0) + row["failed"]
        for kind, count in failures.items():
            failed.add_metric([kind], count)
        yield runs
        yield failed


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def registry(settings: Settings | None = None, include_state: bool = True) -> CollectorRegistry:
    """The registry to expose: the multiprocess aggregate when workers write to a directory,
    the process's own otherwise; plus the scrape-time gauges when ``settings`` are given."""
    if multiprocess_dir():
        reg = CollectorRegistry(auto_describe=False)
        multiprocess.MultiProcessCollector(reg)
    else:
        reg = CollectorRegistry(auto_describe=False)
        reg.register(_Forward(REGISTRY))
    if settings is not None and include_state:
        reg.register(StateCollector(settings))
    return reg


class _Forward(Collector):
    """Expose the process-wide default registry inside a per-scrape registry."""

    def __init__(self, source: CollectorRegistry) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        return self.source.collect()


def render(settings: Settings | None = None, include_state: bool = True) -> tuple[bytes, str]:
    """The Prometheus text exposition and its content type, for a ``/metrics`` route."""
    return generate_latest(registry(settings, include_state)), CONTENT_TYPE_LATEST


def serve(port: int, settings: Settings | None = None, include_state: bool = False,
          addr: str = "0.0.0.0") -> Any:  # noqa: S104 - scraped from other containers
    """Serve ``/metrics`` on ``port`` from a background thread; returns the server."""
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=addr,
                                        registry=registry(settings, include_state))
    return server


def mark_process_dead(pid: int) -> None:
    """Forget a dead pool child's live gauges (multiprocess mode only)."""
    if multiprocess_dir():
        multiprocess.mark_process_dead(pid)


def serve_worker_metrics(settings: Settings) -> Any:
    """In a worker's main process, before the pool starts: clear the multiprocess directory
    of an earlier run and serve the pool's metrics on ``settings.metrics_port``."""
    if not settings.metrics_port:
        return None
    directory = multiprocess_dir()
    if directory:
        for name in os.listdir(directory):
            if name.endswith(".db"):
                os.remove(os.path.join(directory, name))
    try:
        server = serve(settings.metrics_port)
    except OSError as exc:
        log.error("cannot serve worker metrics on port %s: %s", settings.metrics_port, exc)
        return None
    log.info("worker metrics on :%s/metrics", settings.metrics_port,
             extra={"metrics_port": settings.metrics_port, "multiprocess_dir": directory})
    return server
