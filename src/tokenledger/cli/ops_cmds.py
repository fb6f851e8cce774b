"""Operator commands: ``tokenledger flower`` and ``tokenledger status``."""

from __future__ import annotations

import os
import sys
from typing import Annotated, Any

import typer
from rich.table import Table

from tokenledger.cli import app, console, fail, print_json, settings
from tokenledger.config import Settings

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]


def parse_basic_auth(value: str) -> list[str]:
    """``user:password[,user2:password2]`` as a list; raises ValueError naming the problem."""
    entries = [e.strip() for e in value.split(",") if e.strip()]
    if not entries:
        raise ValueError("no credentials given")
    for entry in entries:
        user, sep, password = entry.partition(":")
        if not sep or not user or not password:
            raise ValueError("each entry must be user:password with both parts non-empty")
    return entries


@app.command()
def flower(
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 5555,
    address: Annotated[str, typer.Option(help="Address to bind (0.0.0.0 in a container).")]
    = "127.0.0.1",
    url_prefix: Annotated[str | None, typer.Option(help="Serve under this path prefix.")]
    = None,
    unsafe_no_auth: Annotated[bool, typer.Option(
        "--unsafe-no-auth", help="Start without authentication (local debugging only).")]
    = False,
) -> None:
    """Run Flower on the configured broker, behind basic auth (TOKENLEDGER_FLOWER_BASIC_AUTH)."""
    s = settings()
    env = {k: v for k, v in os.environ.items() if k != "FLOWER_BASIC_AUTH"}
    if s.flower_basic_auth:
        try:
            entries = parse_basic_auth(s.flower_basic_auth)
        except ValueError as exc:
            fail(f"TOKENLEDGER_FLOWER_BASIC_AUTH: {exc}")
        # Through the environment, not argv: the password stays out of `ps`.
        env["FLOWER_BASIC_AUTH"] = ",".join(entries)
    elif not unsafe_no_auth:
        fail("Flower needs authentication: set TOKENLEDGER_FLOWER_BASIC_AUTH=user:password "
             "(or pass --unsafe-no-auth for a local, throw-away instance)")
    else:
        console.print("[yellow]warning:[/yellow] Flower is starting WITHOUT authentication",
                      highlight=False)
    argv = [sys.executable, "-m", "celery", "-A", "workers", "flower", f"--port={port}",
            f"--address={address}"]
    if url_prefix:
        argv.append(f"--url_prefix={url_prefix}")
    sys.stdout.flush()
    os.execve(sys.executable, argv, env)


def gather_status(s: Settings, timeout: float = 1.0) -> dict[str, Any]:
    """Everything ``tokenledger status`` shows, as plain data."""
    from tokenledger import health, metrics
    from tokenledger.logs import mask_url

    ready, checks = health.readiness(s)
    report: dict[str, Any] = {
        "ready": ready,
        "checks": [c.as_dict() for c in checks],
        "database": mask_url(s.database_url),
        "broker": mask_url(s.broker_url),
    }
    workers, queues, workers_error = _workers(s, timeout) if checks[1].ok else ({}, set(),
                                                                               "broker down")
    report["workers"] = workers
    if workers_error:
        report["workers_error"] = workers_error
    report["queues"] = _safe(lambda: metrics.queue_depths(s, queues))
    report["unacked"] = _safe(lambda: metrics.unacked(s))
    if checks[0].ok:
        report["dlq"] = _safe(lambda: metrics.dlq_depth(s))
        report["holds_open"] = _safe(lambda: metrics.holds_open(s))
        report["renewal_runs"] = _safe(lambda: _last_runs(s))
    else:
        report["dlq"] = report["holds_open"] = report["renewal_runs"] = None
    return report


def _safe(produce: Any) -> Any:
    try:
        return produce()
    except Exception as exc:  # noqa: BLE001 - status reports what it can
        return {"error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__}


def _workers(s: Settings, timeout: float) -> tuple[dict[str, Any], set[str], str | None]:
    """Workers answering a ping, and the queues they consume."""
    from celery import Celery

    from tokenledger.broker import celery_config

    celery = Celery("tokenledger-status", set_as_current=False)
    celery.conf.update(celery_config(s))
    try:
        inspect = celery.control.inspect(timeout=timeout)
        replies = inspect.ping() or {}
        queues_by_worker = (inspect.active_queues() or {}) if replies else {}
    except Exception as exc:  # noqa: BLE001 - e.g. the embedded broker has no broadcast
        return {}, set(), f"cannot inspect workers on this broker: {exc}"
    finally:
        celery.close()
    if not replies and s.embedded_broker:
        return {}, set(), "the embedded broker cannot broadcast: workers cannot be pinged"
    workers: dict[str, Any] = {}
    queues: set[str] = set()
    for name in sorted(replies):
        consumed = sorted(q.get("name", "") for q in queues_by_worker.get(name) or [])
        queues.update(consumed)
        workers[name] = {"ok": replies[name].get("ok") == "pong", "queues": consumed}
    return workers, queues, None


def _last_runs(s: Settings, limit: int = 5) -> list[dict[str, Any]] | None:
    from sqlalchemy import text

    from tokenledger import metrics
    from tokenledger.db import get_engine

    if "renewal_runs" not in metrics.optional_tables(s, ttl=0):
        return None
    with get_engine(s.database_url).connect() as conn:
        rows = conn.execute(text(
            "SELECT id, kind, status, dry_run, total_processed, successful, failed, created_at,"
            " finished_at FROM renewal_runs ORDER BY id DESC LIMIT :n"), {"n": limit})
        return [dict(r._mapping) for r in rows]


@app.command()
def status(
    json_: JsonOpt = False,
    timeout: Annotated[float, typer.Option(min=0.1, help="Seconds to wait for workers.")] = 1.0,
) -> None:
    """Queue depths, workers seen, DLQ size and the last renewal runs; exit 1 if not ready."""
    report = gather_status(settings(), timeout)
    if json_:
        print_json(report)
    else:
        _print_status(report)
    if not report["ready"]:
        raise typer.Exit(1)


def _print_status(report: dict[str, Any]) -> None:
    checks = Table(title="services")
    for col in ("check", "ok", "detail", "ms"):
        checks.add_column(col)
    for c in report["checks"]:
        checks.add_row(c["name"], "[green]yes[/green]" if c["ok"] else "[red]no[/red]",
                       c["detail"], f"{c['latency_ms']:.1f}")
    console.print(checks)

    queues = Table(title="queues")
    queues.add_column("queue")
    queues.add_column("waiting", justify="right")
    if isinstance(report["queues"], dict) and "error" not in report["queues"]:
        for name, depth in report["queues"].items():
            queues.add_row(name, str(depth))
    else:
        queues.add_row("?", str(report["queues"]))
    if isinstance(report.get("unacked"), int):
        queues.add_row("(delivered, unacked)", str(report["unacked"]))
    console.print(queues)

    workers = Table(title="workers")
    workers.add_column("worker")
    workers.add_column("ping")
    workers.add_column("queues")
    for name, info in report["workers"].items():
        workers.add_row(name, "pong" if info["ok"] else "?", ", ".join(info["queues"]))
    if not report["workers"]:
        workers.add_row(report.get("workers_error") or "[yellow]none answered[/yellow]", "", "")
    console.print(workers)

    console.print(f"dead letters: {report['dlq']}    holds open: "
                  f"{'n/a' if report['holds_open'] is None else report['holds_open']}",
                  highlight=False)
    runs = report.get("renewal_runs")
    if not runs:
        console.print("renewal runs: none", highlight=False)
        return
    if isinstance(runs, dict):
        console.print(f"renewal runs: {runs}", highlight=False)
        return
    table = Table(title="last renewal runs")
    for col in ("id", "kind", "status", "dry run", "processed", "ok", "failed", "started",
                "finished"):
        table.add_column(col)
    for r in runs:
        table.add_row(str(r["id"]), r["kind"], r["status"], "yes" if r["dry_run"] else "",
                      str(r["total_processed"]), str(r["successful"]), str(r["failed"]),
                      str(r["created_at"])[:19], str(r["finished_at"] or "")[:19])
    console.print(table)
