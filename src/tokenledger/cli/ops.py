"""Operating tokenledger: ``status``, ``demo`` and ``bench``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from tokenledger.cli.base import ExitCode, JsonOpt, app, console, fail, print_json, settings

if TYPE_CHECKING:
    from tokenledger.config import Settings


def gather_status(s: Settings, timeout: float = 1.0) -> dict[str, Any]:
    """Everything ``tokenledger status`` shows, as plain data."""
    from tokenledger.ops import health, metrics
    from tokenledger.ops.logs import mask_url

    ready, checks = health.readiness(s)
    report: dict[str, Any] = {
        "ready": ready,
        "checks": [c.as_dict() for c in checks],
        "database": mask_url(s.database_url) or f"embedded PostgreSQL in {s.home}",
        "broker": mask_url(s.broker_url) or f"embedded Redis in {s.home}",
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
    from tokenledger.queue import workers

    return workers.as_status(workers.ask(s, timeout))


def _last_runs(s: Settings, limit: int = 5) -> list[dict[str, Any]] | None:
    from sqlalchemy import text

    from tokenledger.db.engine import get_engine
    from tokenledger.ops import metrics

    if "renewal_runs" not in metrics.optional_tables(s, ttl=0):
        return None
    with get_engine(s.ledger_url()).connect() as conn:
        rows = conn.execute(text(
            "SELECT id, kind, status, dry_run, total_processed, successful, failed, created_at,"
            " finished_at FROM renewal_runs ORDER BY id DESC LIMIT :n"), {"n": limit})
        return [dict(r._mapping) for r in rows]


@app.command()
def status(
    json_: JsonOpt = False,
    timeout: Annotated[float, typer.Option(min=0.1, help="Seconds to wait for workers.")] = 1.0,
) -> None:
    """Queue depths, workers seen, DLQ size and the last renewal runs; exit 1 if not ready
    (one line when the database is unreachable or not migrated)."""
    s = settings()
    _require_schema(s)
    report = gather_status(s, timeout)
    if json_:
        print_json(report)
    else:
        _print_status(report)
    if not report["ready"]:
        raise typer.Exit(1)


def _require_schema(s: Settings) -> None:
    """End ``status`` in one line (exit 1) when the database cannot answer for the ledger:
    every other line of the report would only repeat that."""
    from tokenledger.db.migrate import current_revision, head_revision
    from tokenledger.errors import NotMigrated, as_ledger_error

    try:
        revision = current_revision(s.ledger_url())
    except Exception as exc:  # noqa: BLE001 - reported as tokenledger's own error
        fail(str(as_ledger_error(exc)), ExitCode.UNEXPECTED)
    if revision != head_revision():
        found = "no tokenledger schema" if revision is None else f"schema {revision}"
        fail(str(NotMigrated(f"the database has {found}, this release needs "
                             f"{head_revision()}: run `tokenledger migrate` "
                             "(TOKENLEDGER_DATABASE_URL)")), ExitCode.UNEXPECTED)


def _print_status(report: dict[str, Any]) -> None:
    from rich.table import Table

    checks = Table(title="services")
    for col in ("check", "ok", "detail", "ms"):
        checks.add_column(col)
    for c in report["checks"]:
        checks.add_row(c["name"], "[green]yes[/green]" if c["ok"] else "[red]no[/red]",
                       c["detail"], f"{c['latency_ms']:.1f}")
    console().print(checks)

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
    console().print(queues)

    workers = Table(title="workers")
    workers.add_column("worker")
    workers.add_column("ping")
    workers.add_column("queues")
    for name, info in report["workers"].items():
        workers.add_row(name, "pong" if info["ok"] else "?", ", ".join(info["queues"]))
    if not report["workers"]:
        workers.add_row(report.get("workers_error") or "[yellow]none answered[/yellow]", "", "")
    console().print(workers)

    console().print(f"dead letters: {report['dlq']}    holds open: "
                  f"{'n/a' if report['holds_open'] is None else report['holds_open']}",
                  highlight=False)
    runs = report.get("renewal_runs")
    if not runs:
        console().print("renewal runs: none", highlight=False)
        return
    if isinstance(runs, dict):
        console().print(f"renewal runs: {runs}", highlight=False)
        return
    table = Table(title="last renewal runs")
    for col in ("id", "kind", "status", "dry run", "processed", "ok", "failed", "started",
                "finished"):
        table.add_column(col)
    for r in runs:
        table.add_row(str(r["id"]), r["kind"], r["status"], "yes" if r["dry_run"] else "",
                      str(r["total_processed"]), str(r["successful"]), str(r["failed"]),
                      str(r["created_at"])[:19], str(r["finished_at"] or "")[:19])
    console().print(table)


@app.command()
def demo(
    users: Annotated[int, typer.Option(min=1, max=100_000, help="Accounts to open.")] = 200,
    events: Annotated[int, typer.Option(min=10, max=1_000_000, help="Events to publish.")] = 5000,
    seed: Annotated[int, typer.Option(help="Random seed for the stream.")] = 7,
) -> None:
    """Run a real worker on the configured (default: embedded) stack with a realistic stream."""
    from tokenledger.ops.demo import run_demo

    if not run_demo(settings(), users=users, events=events, seed=seed, console=console()):
        raise typer.Exit(1)


@app.command()
def bench(
    accounts: Annotated[int, typer.Option(min=1, help="Accounts seeded for the run.")]
    = 100_000,
    single: Annotated[int, typer.Option(min=1000, help="Single events per phase.")] = 20_000,
    batch_events: Annotated[int, typer.Option(min=1000, help="Events published with "
                                              "publish_many.")] = 300_000,
    baseline_events: Annotated[int, typer.Option(min=100, help="Events of the lean SQL "
                                                 "baseline.")] = 10_000,
    latency_seconds: Annotated[float, typer.Option(min=1, help="Length of the latency "
                                                   "phase.")] = 15.0,
    sweep: Annotated[bool, typer.Option(help="Events/s against producer threads (the "
                                        "plot).")] = True,
    http_seconds: Annotated[float, typer.Option(help="Token-process start over HTTP; 0 skips.")]
    = 10.0,
    renewal_accounts: Annotated[int, typer.Option(help="Accounts in the renewal run; 0 skips.")]
    = 1_000_000,
    pg_admin_url: Annotated[str, typer.Option(help="Server to create tokenledger_bench on.")]
    = "postgresql://postgres@127.0.0.1:5432/postgres",
    broker_url: Annotated[str, typer.Option(help="Redis broker for the run.")]
    = "redis://127.0.0.1:6379/0",
    out: Annotated[Path | None, typer.Option(help="Directory for the JSON and the plots.")]
    = Path("bench/results"),
) -> None:
    """Measure the pipeline beside a lean SQL baseline; one table with the targets, JSON
    and two plots under bench/results/."""
    from tokenledger.ops.bench import print_report, run_bench, run_harnesses

    report = run_bench(admin_url=pg_admin_url, broker_url=broker_url, accounts=accounts,
                       single=single, batch_events=batch_events,
                       baseline_events=baseline_events, latency_seconds=latency_seconds,
                       sweep=sweep, console=console())
    run_harnesses(report, http_seconds=http_seconds, renewal_accounts=renewal_accounts,
                  console=console())
    print_report(report, console(), out)
