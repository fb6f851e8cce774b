"""Commands for the ledger core: migrate, worker, accounts, balance, history, publish,
verify, dlq, catalog, demo and bench."""

from __future__ import annotations

import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from tokenledger.cli import app, console, fail, print_json, settings
from tokenledger.client import event_fields
from tokenledger.db import unit_of_work

accounts_app = typer.Typer(no_args_is_help=True, help="Open and inspect accounts.")
publish_app = typer.Typer(no_args_is_help=True, help="Publish an event to the workers.")
dlq_app = typer.Typer(no_args_is_help=True, help="The dead-letter store.")
catalog_app = typer.Typer(no_args_is_help=True, help="Plans, features and model prices.")
app.add_typer(accounts_app, name="accounts")
app.add_typer(publish_app, name="publish")
app.add_typer(dlq_app, name="dlq")
app.add_typer(catalog_app, name="catalog")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


@app.command()
def migrate() -> None:
    """Create or upgrade the schema and load the catalog if none is stored."""
    from tokenledger.migrate import migrate as run

    s = settings()
    version = run(s.database_url, s.catalog)
    loaded = f"; catalog loaded (version {version})" if version else ""
    console.print(f"[green]schema up to date[/green]{loaded}")


@app.command()
def worker(
    concurrency: Annotated[int | None, typer.Option("-c", "--concurrency")] = None,
    loglevel: Annotated[str, typer.Option("-l", "--loglevel")] = "info",
    beat: Annotated[bool, typer.Option("-B", "--beat", help="Embed beat (one only).")] = False,
) -> None:
    """Run a Celery worker on the configured broker (``celery -A workers worker``)."""
    s = settings()
    argv = [sys.executable, "-m", "celery", "-A", "workers", "worker", "-Q", s.queue,
            "-l", loglevel]
    if concurrency:  # otherwise TOKENLEDGER_WORKER_CONCURRENCY, or two per core
        argv += ["-c", str(concurrency)]
    if beat:
        argv.append("-B")
    os.execv(sys.executable, argv)


@accounts_app.command("open")
def accounts_open(
    user_id: str,
    plan: Annotated[str | None, typer.Option(help="Plan code (default: the catalog's).")] = None,
    timezone: Annotated[str | None, typer.Option(help="IANA timezone.")] = None,
) -> None:
    """Open an account now and grant the plan's opening tokens."""
    from tokenledger import LedgerClient

    with LedgerClient(settings()) as client:
        key = client.open_account(user_id, plan=plan, timezone=timezone)
        result = client.result(key)
    console.print(f"{user_id}: {result.status}"
                  + (f" ({result.reason})" if result.reason else "")
                  + f", balance {client.balance(user_id).balance}")


@app.command()
def balance(user_id: str, json_: JsonOpt = False) -> None:
    """An account's balance and its wallets."""
    from tokenledger import LedgerClient

    with LedgerClient(settings()) as client:
        b = client.balance(user_id)
    if json_:
        print_json({"user_id": b.user_id, "plan": b.plan, "balance": b.balance,
                    "wallets": [w.__dict__ for w in b.wallets]})
        return
    table = Table(title=f"{b.user_id} ({b.plan}): {b.balance} tokens")
    for col in ("wallet", "type", "balance", "expires", "live"):
        table.add_column(col)
    for w in b.wallets:
        table.add_row(str(w.id), w.wallet_type, str(w.balance),
                      w.expires_at.isoformat() if w.expires_at else "-", "yes" if w.is_active
                      else "no")
    console.print(table)


@app.command()
def history(
    user_id: str,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 20,
    offset: Annotated[int, typer.Option(min=0)] = 0,
    type_: Annotated[str | None, typer.Option("--type")] = None,
    feature: Annotated[str | None, typer.Option()] = None,
    json_: JsonOpt = False,
) -> None:
    """An account's ledger entries, newest first."""
    from tokenledger.reports import history as query

    with unit_of_work(settings().database_url) as session:
        rows = query(session, user_id, limit=limit, offset=offset, type_=type_,
                     feature=feature)
    if json_:
        print_json(rows)
        return
    table = Table(title=f"history of {user_id}")
    for col in ("id", "when", "type", "feature", "wallet", "amount", "after", "key"):
        table.add_column(col)
    for r in rows:
        table.add_row(str(r["id"]), r["created_at"][:19], r["type"], r["feature"] or "",
                      r["wallet_type"], f"{r['amount']:+d}", str(r["balance_after"]),
                      r["event_key"] or "")
    console.print(table)


def _publish_and_report(event: dict, wait: float) -> None:
    from tokenledger import LedgerClient

    with LedgerClient(settings()) as client:
        key = client.publish(event)
        console.print(f"published {event['type']} [bold]{key}[/bold]")
        if wait > 0:
            result = client.result(key, timeout=wait)
            console.print(f"{result.status}" + (f": {result.reason}" if result.reason else "")
                          + (f" {result.data}" if result.data else ""), highlight=False)


WaitOpt = Annotated[float, typer.Option(help="Seconds to wait for the outcome (0: don't).")]


@publish_app.command("charge")
def publish_charge(
    user_id: str,
    feature: Annotated[str | None, typer.Option()] = None,
    amount: Annotated[int | None, typer.Option()] = None,
    key: Annotated[str | None, typer.Option()] = None,
    allow_overdraft: Annotated[bool, typer.Option("--allow-overdraft")] = False,
    preferred_wallet_type: Annotated[str | None, typer.Option()] = None,
    wait: WaitOpt = 10.0,
) -> None:
    """Charge by feature or amount."""
    _publish_and_report(event_fields(type="charge", user_id=user_id, feature=feature,
                                 amount=amount, key=key, allow_overdraft=allow_overdraft,
                                 preferred_wallet_type=preferred_wallet_type), wait)


@publish_app.command("credit")
def publish_credit(
    user_id: str,
    amount: int,
    wallet_type: Annotated[str, typer.Option()] = "PREMIUM",
    expires_at: Annotated[datetime | None, typer.Option()] = None,
    reason: Annotated[str | None, typer.Option()] = None,
    key: Annotated[str | None, typer.Option()] = None,
    wait: WaitOpt = 10.0,
) -> None:
    """Add credits to a wallet."""
    _publish_and_report(event_fields(type="credit", user_id=user_id, amount=amount,
                                 wallet_type=wallet_type, reason=reason, key=key,
                                 expires_at=expires_at.isoformat() if expires_at else None), wait)


@publish_app.command("refund")
def publish_refund(
    user_id: str,
    original_key: str,
    amount: Annotated[int | None, typer.Option()] = None,
    reason: Annotated[str | None, typer.Option()] = None,
    key: Annotated[str | None, typer.Option()] = None,
    wait: WaitOpt = 10.0,
) -> None:
    """Refund (part of) an earlier charge."""
    _publish_and_report(event_fields(type="refund", user_id=user_id, original_key=original_key,
                                 amount=amount, reason=reason, key=key), wait)


@app.command()
def verify(json_: JsonOpt = False) -> None:
    """Check every wallet against its entries and every key applied once; exit 1 if not."""
    from tokenledger.ledger.verify import verify as check

    with unit_of_work(settings().database_url) as session:
        report = check(session)
    if json_:
        print_json(report.as_dict())
    else:
        mark = "[green]OK[/green]" if report.ok else "[red]MISMATCH[/red]"
        console.print(f"verify {mark}: {report.wallets} wallets, {report.entries} entries, "
                      f"{report.outcomes} outcomes; {len(report.balance_mismatches)} balance "
                      f"mismatches, {len(report.chain_breaks)} chain breaks, "
                      f"{len(report.applied_twice)} keys applied twice, "
                      f"{len(report.entries_without_outcome)} entries without an outcome")
        for problem in (report.balance_mismatches + report.chain_breaks + report.applied_twice
                        + report.entries_without_outcome)[:20]:
            console.print(f"  {problem}", highlight=False)
    if not report.ok:
        raise typer.Exit(1)


@dlq_app.command("list")
def dlq_list(limit: Annotated[int, typer.Option(min=1)] = 50, json_: JsonOpt = False) -> None:
    """Dead letters, oldest first."""
    from tokenledger.dlq import list_dead_letters

    with unit_of_work(settings().database_url) as session:
        rows = list_dead_letters(session, limit)
    if json_:
        print_json(rows)
        return
    table = Table(title=f"{len(rows)} dead letter(s)")
    for col in ("id", "key", "attempts", "last seen", "reason"):
        table.add_column(col)
    for r in rows:
        table.add_row(str(r["id"]), r["key"] or "-", str(r["attempts"]), r["last_seen"][:19],
                      r["reason"][:100])
    console.print(table)


IdsArg = Annotated[list[int] | None, typer.Argument(help="Dead-letter ids.")]
AllOpt = Annotated[bool, typer.Option("--all", help="Every dead letter.")]


def _ids(ids: list[int] | None, all_: bool) -> list[int] | None:
    if not ids and not all_:
        fail("name dead-letter ids, or pass --all")
    return None if all_ else ids


@dlq_app.command("retry")
def dlq_retry(ids: IdsArg = None, all_: AllOpt = False) -> None:
    """Publish dead letters again (the worker re-validates them) and remove them."""
    from tokenledger import LedgerClient
    from tokenledger.dlq import payload_of, select_ids

    wanted = _ids(ids, all_)
    s = settings()
    with LedgerClient(s) as client, unit_of_work(s.database_url) as session:
        letters = select_ids(session, wanted)
        for letter in letters:
            client._publish(payload_of(letter))  # raw: it is validated again by the worker
            session.delete(letter)
    console.print(f"re-published {len(letters)} dead letter(s)")


@dlq_app.command("drop")
def dlq_drop(ids: IdsArg = None, all_: AllOpt = False) -> None:
    """Delete dead letters for good."""
    from tokenledger.dlq import drop

    wanted = _ids(ids, all_)
    with unit_of_work(settings().database_url) as session:
        count = drop(session, wanted)
    console.print(f"dropped {count} dead letter(s)")


@catalog_app.command("show")
def catalog_show(json_: JsonOpt = False) -> None:
    """The stored catalog: plans, features and model prices."""
    from tokenledger.catalog import current_catalog

    with unit_of_work(settings().database_url) as session:
        cat = current_catalog(session)
    if json_:
        print_json({"version": cat.version, "default_plan": cat.default_plan,
                    "plans": {k: v.model_dump() for k, v in cat.plans.items()},
                    "features": {k: v.model_dump() for k, v in cat.features.items()},
                    "models": {k: v.model_dump(mode="json") for k, v in cat.models.items()}})
        return
    plans = Table(title=f"plans (catalog version {cat.version}, default {cat.default_plan})")
    for col in ("plan", "allocation", "opening", "period", "mode", "rollover cap", "features"):
        plans.add_column(col)
    for code, p in cat.plans.items():
        plans.add_row(code, str(p.allocation), str(p.opening_tokens), p.period,
                      p.renewal_mode, str(p.rollover_cap or "-"), ", ".join(p.features))
    features = Table(title="features")
    for col in ("feature", "pricing", "cost", "min", "overdraft", "model"):
        features.add_column(col)
    for code, f in cat.features.items():
        features.add_row(code, f.pricing, str(f.cost), str(f.min_cost),
                         "yes" if f.allow_overdraft else "no", f.default_model or "-")
    models = Table(title="model prices")
    for col in ("model", "in w", "out w", "tokens/credit", "profit %", "$/1k in", "$/1k out"):
        models.add_column(col)
    for code, m in cat.models.items():
        models.add_row(code, str(m.input_weight), str(m.output_weight),
                       str(m.tokens_per_credit), str(m.profit_percent),
                       str(m.provider_input_per_1k or "-"), str(m.provider_output_per_1k or "-"))
    console.print(plans, features, models)


@app.command()
def demo(
    users: Annotated[int, typer.Option(min=1, max=100_000, help="Accounts to open.")] = 200,
    events: Annotated[int, typer.Option(min=10, max=1_000_000, help="Events to publish.")] = 5000,
    seed: Annotated[int, typer.Option(help="Random seed for the stream.")] = 7,
) -> None:
    """Run a real worker on the configured (default: embedded) stack with a realistic stream."""
    from tokenledger.demo import run_demo

    if not run_demo(settings(), users=users, events=events, seed=seed, console=console):
        raise typer.Exit(1)


@app.command()
def bench(
    accounts: Annotated[int, typer.Option(min=1)] = 100_000,
    events: Annotated[int, typer.Option(min=1000)] = 200_000,
    baseline_events: Annotated[int, typer.Option(min=100)] = 5_000,
    naive_events: Annotated[int, typer.Option(min=100)] = 5_000,
    latency_seconds: Annotated[float, typer.Option(min=1)] = 10.0,
    concurrency: Annotated[int, typer.Option(min=1)] = 4,
    http_seconds: Annotated[float, typer.Option(help="Token-process start over HTTP; 0 skips.")]
    = 10.0,
    renewal_accounts: Annotated[int, typer.Option(help="Accounts in the renewal run; 0 skips.")]
    = 1_000_000,
    pg_admin_url: Annotated[str, typer.Option(help="Server to create tokenledger_bench on.")]
    = "postgresql://postgres@127.0.0.1:5432/postgres",
    broker_url: Annotated[str, typer.Option()] = "redis://127.0.0.1:6379/0",
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write JSON here.")]
    = Path("bench/results/latest.json"),
) -> None:
    """Measure the pipeline on PostgreSQL + Redis beside the baselines; prints table + JSON."""
    from tokenledger.bench import print_report, run_bench, run_harnesses

    report = run_bench(admin_url=pg_admin_url, broker_url=broker_url, accounts=accounts,
                       events=events, baseline_events=baseline_events,
                       naive_events=naive_events, latency_seconds=latency_seconds,
                       concurrency=concurrency, console=console)
    run_harnesses(report, http_seconds=http_seconds, renewal_accounts=renewal_accounts,
                  console=console)
    print_report(report, console, json_out)
