"""The processes: ``migrate``, ``worker``, ``beat``, ``api``, ``flower`` and the embedded
servers (``embedded status|stop``)."""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Annotated

import typer

from tokenledger.cli.base import app, console, fail, print_json, settings

embedded_app = typer.Typer(no_args_is_help=True,
                           help="The embedded PostgreSQL and Redis (the default with nothing "
                                "configured).")
app.add_typer(embedded_app, name="embedded")

CELERY_APP = "tokenledger.queue.app"


@app.command()
def migrate() -> None:
    """Create or upgrade the schema and load the catalog if none is stored (safe twice)."""
    from tokenledger.db.migrate import migrate as run

    s = settings()
    version = run(s.ledger_url(), s.catalog)
    loaded = f"; catalog loaded (version {version})" if version else ""
    console().print(f"[green]schema up to date[/green]{loaded}")


@app.command()
def worker(
    concurrency: Annotated[int | None, typer.Option(
        "-c", "--concurrency", help="Worker processes (default: two per core).")] = None,
    loglevel: Annotated[str, typer.Option("-l", "--loglevel", help="Log level.")] = "info",
    beat: Annotated[bool, typer.Option("-B", "--beat",
                                       help="Embed the scheduler (run one only).")] = False,
) -> None:
    """Run a Celery worker (``celery -A tokenledger.queue.app worker``)."""
    s = settings()
    argv = [sys.executable, "-m", "celery", "-A", CELERY_APP, "worker", "-Q", s.queue,
            "-l", loglevel]
    if concurrency:  # otherwise TOKENLEDGER_WORKER_CONCURRENCY, or two per core
        argv += ["-c", str(concurrency)]
    if beat:
        argv.append("-B")
    os.execv(sys.executable, argv)


@app.command()
def beat(loglevel: Annotated[str, typer.Option("-l", "--loglevel", help="Log level.")]
         = "info") -> None:
    """Run the scheduler; only one beat schedules at a time (the others wait)."""
    settings()  # fail early, in one line, on a bad configuration
    os.execv(sys.executable, [sys.executable, "-m", "celery", "-A", CELERY_APP, "beat",
                              "-l", loglevel])


@app.command()
def api(
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind.")] = 8000,
    workers: Annotated[int, typer.Option(min=1, max=64, help="Worker processes.")] = 1,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
    access_log: Annotated[bool, typer.Option(help="Log every request.")] = False,
) -> None:
    """Serve the HTTP API (OpenAPI at /docs) with uvicorn; uvloop/httptools when present."""
    import uvicorn

    settings()  # fail early, in one line, on a bad environment
    fast = importlib.util.find_spec("uvloop") is not None
    uvicorn.run(
        "tokenledger.api:app_from_env", factory=True, host=host, port=port, workers=workers,
        log_level=log_level, access_log=access_log,
        log_config=None,  # our JSON handler (app_from_env) is the only one
        loop="uvloop" if fast else "asyncio",
        http="httptools" if importlib.util.find_spec("httptools") else "h11",
        proxy_headers=True, server_header=False,
        # A busy host can take more than uvicorn's default 5 s to import a worker.
        timeout_worker_healthcheck=30,
    )


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
    """Run Flower on the broker, behind basic auth (TOKENLEDGER_FLOWER_BASIC_AUTH)."""
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
        console().print("[yellow]warning:[/yellow] Flower is starting WITHOUT authentication",
                        highlight=False)
    argv = [sys.executable, "-m", "celery", "-A", CELERY_APP, "flower", f"--port={port}",
            f"--address={address}"]
    if url_prefix:
        argv.append(f"--url_prefix={url_prefix}")
    sys.stdout.flush()
    os.execve(sys.executable, argv, env)


@embedded_app.command("status")
def embedded_status(json_: Annotated[bool, typer.Option("--json", help="Print JSON.")]
                    = False) -> None:
    """Whether the embedded servers run, and where their data lives."""
    from tokenledger.db import embedded as pg
    from tokenledger.queue import embedded as broker

    s = settings()
    report = {"home": str(s.home), "postgresql": pg.running(s.home),
              "redis": broker.running(s.home),
              "database_url_set": not s.embedded_database,
              "broker_url_set": not s.embedded_broker}
    if json_:
        print_json(report)
        return
    for name in ("postgresql", "redis"):
        state = "[green]running[/green]" if report[name] else "stopped"
        console().print(f"{name}: {state}", highlight=False)
    console().print(f"data: {s.home}", highlight=False)


@embedded_app.command("stop")
def embedded_stop() -> None:
    """Stop the embedded PostgreSQL and Redis (their data is kept)."""
    from tokenledger.db import embedded as pg
    from tokenledger.queue import embedded as broker

    s = settings()
    stopped = [name for name, stop in (("postgresql", pg.stop), ("redis", broker.stop))
               if stop(s.home)]
    console().print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running",
                    highlight=False)
