"""``tokenledger bench``: the pipeline measured on PostgreSQL + Redis, beside baselines.

Every figure comes from one run on one machine, so read them as ratios:
- ours, spread: events over many accounts, published in messages of up to 1,000, applied
  by real workers (published → committed);
- ours, one account: the same stream, every event on a single account;
- SQL baseline: what teams hand-build — one transaction per event (lock the wallet, check,
  update, insert the entry and the idempotency row, commit);
- naive pipeline: one Celery task per event through the same workers;
- latency: publish → committed at half of the spread throughput, p50/p99.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from rich.console import Console
from rich.table import Table
from sqlalchemy import text

from tokenledger.config import Settings
from tokenledger.db.engine import dispose_engines, session_factory
from tokenledger.db.migrate import migrate
from tokenledger.ledger.verify import verify
from tokenledger.ops.demo import start_worker, stop_worker
from tokenledger.sdk.client import LedgerClient

START_BALANCE = 1_000_000_000


@dataclass
class BenchReport:
    accounts: int
    events: int
    figures: dict[str, dict[str, Any]] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)
    verify_ok: bool | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def fresh_database(admin_url: str, name: str) -> str:
    """Drop and create ``name``; returns its SQLAlchemy URL."""
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}"')
    base = admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    return f"{base}/{name}"


def seed_accounts(url: str, n: int) -> None:
    """Open ``n`` accounts set-based, each with one funded STANDARD wallet (verify-clean)."""
    with session_factory(url).begin() as s:
        s.execute(text(
            "INSERT INTO accounts (user_id, plan_code, timezone, created_at, last_renewal_at,"
            " last_reset_on) SELECT 'b' || g, 'Business', 'UTC', now(), now(),"
            " to_char(now(), 'YYYY-MM-DD') FROM generate_series(1, :n) g"), {"n": n})
        s.execute(text(
            "INSERT INTO wallets (account_id, wallet_type, balance, is_active, created_at)"
            " SELECT id, 'STANDARD', :b, true, now() FROM accounts"), {"b": START_BALANCE})
        s.execute(text(
            "INSERT INTO event_outcomes (key, payload_hash, user_id, event_type, outcome,"
            " result, created_at) SELECT 'open:' || user_id, 'bench', user_id,"
            " 'open_account', 'applied', '{}', now() FROM accounts"))
        s.execute(text(
            "INSERT INTO ledger_entries (account_id, wallet_id, amount, balance_before,"
            " balance_after, type, event_key, created_at) SELECT w.account_id, w.id, :b, 0,"
            " :b, 'OPEN', 'open:' || a.user_id, now() FROM wallets w"
            " JOIN accounts a ON a.id = w.account_id"), {"b": START_BALANCE})
    with psycopg.connect(url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")


def _count(url: str, prefix: str) -> int:
    with session_factory(url).begin() as s:
        return s.scalar(text("SELECT count(*) FROM event_outcomes WHERE key LIKE :p"),
                        {"p": prefix + "%"}) or 0


def _wait_settled(url: str, prefix: str, total: int, timeout: float = 900) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _count(url, prefix) >= total:
            return time.monotonic()
        time.sleep(0.02)
    raise RuntimeError(f"only {_count(url, prefix)} of {total} events settled")


def pipeline_run(client: LedgerClient, url: str, users: list[str], n: int,
                 per_message: int) -> dict[str, Any]:
    """Publish ``n`` charges (``per_message`` per message); events/s published → committed."""
    prefix = f"p{uuid.uuid4().hex[:6]}-"
    events = [{"type": "charge", "key": f"{prefix}{i}", "user_id": users[i % len(users)],
               "amount": 1} for i in range(n)]
    started = time.monotonic()
    if per_message == 1:
        for event in events:
            client.publish(event)
    else:
        for i in range(0, n, per_message):
            client.publish_many(events[i:i + per_message])
    published = time.monotonic()
    finished = _wait_settled(url, prefix, n)
    return {"events": n, "seconds": round(finished - started, 3),
            "publish_seconds": round(published - started, 3),
            "events_per_s": round(n / (finished - started), 1)}


def sql_baseline(url: str, users: list[str], n: int) -> dict[str, Any]:
    """One transaction per event, the way ledgers are usually hand-built."""
    dsn = url.replace("postgresql+psycopg", "postgresql")
    prefix = f"s{uuid.uuid4().hex[:6]}-"
    with psycopg.connect(dsn) as conn:
        started = time.monotonic()
        for i in range(n):
            key, user = f"{prefix}{i}", users[i % len(users)]
            with conn.transaction():
                row = conn.execute(
                    "SELECT w.id, w.balance, a.id FROM wallets w JOIN accounts a"
                    " ON a.id = w.account_id WHERE a.user_id = %s AND"
                    " w.wallet_type = 'STANDARD' FOR UPDATE", (user,)).fetchone()
                if conn.execute("SELECT 1 FROM event_outcomes WHERE key = %s",
                                (key,)).fetchone():
                    continue
                wallet_id, balance, account_id = row
                if balance < 1:
                    continue
                conn.execute("UPDATE wallets SET balance = balance - 1 WHERE id = %s",
                             (wallet_id,))
                conn.execute(
                    "INSERT INTO ledger_entries (account_id, wallet_id, amount, balance_before,"
                    " balance_after, type, event_key, created_at) VALUES"
                    " (%s, %s, -1, %s, %s, 'CHARGE', %s, now())",
                    (account_id, wallet_id, balance, balance - 1, key))
                conn.execute(
                    "INSERT INTO event_outcomes (key, payload_hash, user_id, event_type, outcome,"
                    " created_at) VALUES (%s, 'x', %s, 'charge', 'applied', now())", (key, user))
        elapsed = time.monotonic() - started
    return {"events": n, "seconds": round(elapsed, 3), "events_per_s": round(n / elapsed, 1)}


def latency_run(client: LedgerClient, url: str, users: list[str], rate: float,
                seconds: float) -> dict[str, Any]:
    """Publish at ``rate`` events/s in 10 ms ticks; publish → committed latency per event.

    Each outcome row records when it was stored (just before its transaction commits), so
    latency is read from the rows afterwards, with no observer loading the database."""
    prefix = f"l{uuid.uuid4().hex[:6]}-"
    sent: dict[str, float] = {}
    tick, i = 0.01, 0
    per_tick = max(1, round(rate * tick))
    begin = time.monotonic()
    while time.monotonic() - begin < seconds:
        batch = [{"type": "charge", "key": f"{prefix}{i + j}", "user_id": users[(i + j)
                  % len(users)], "amount": 1} for j in range(per_tick)]
        published = time.time()
        client.publish_many(batch)
        for e in batch:
            sent[e["key"]] = published
        i += per_tick
        next_tick = begin + (i / per_tick) * tick
        time.sleep(max(0.0, next_tick - time.monotonic()))
    _wait_settled(url, prefix, len(sent))
    with session_factory(url).begin() as s:
        stored = dict(s.execute(text(
            "SELECT key, extract(epoch FROM created_at) FROM event_outcomes"
            " WHERE key LIKE :p"), {"p": prefix + "%"}).all())
    lat = sorted((float(stored[k]) - sent[k]) * 1000 for k in sent if k in stored)
    return {"rate": round(rate), "events": len(sent), "observed": len(lat),
            "p50_ms": round(statistics.median(lat), 1),
            "p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 1)}


def run_bench(*, admin_url: str, broker_url: str, accounts: int = 100_000,
              events: int = 200_000, baseline_events: int = 5_000, naive_events: int = 5_000,
              latency_seconds: float = 10, concurrency: int = 4,
              console: Console | None = None) -> BenchReport:
    """Run every measurement in one go on a fresh database ``tokenledger_bench``."""
    console = console or Console()
    url = fresh_database(admin_url, "tokenledger_bench")
    migrate(url)
    console.print(f"seeding {accounts:,} accounts …")
    seed_accounts(url, accounts)
    settings = Settings(database_url=url, broker_url=broker_url,
                        queue=f"tlbench-{uuid.uuid4().hex[:6]}")
    report = BenchReport(accounts=accounts, events=events)
    users = [f"b{i}" for i in range(1, accounts + 1)]
    log = Path(tempfile.gettempdir()) / "tokenledger-bench-worker.log"
    worker = start_worker(settings, log, concurrency=concurrency)
    try:
        with LedgerClient(settings) as client:
            pipeline_run(client, url, users, 5_000, 1000)  # warm up pools and caches
            console.print(f"ours, spread over {accounts:,} accounts: {events:,} events …")
            report.figures["ours_spread"] = pipeline_run(client, url, users, events, 1000)
            console.print("ours, every event on one account …")
            report.figures["ours_one_account"] = pipeline_run(client, url, users[:1], events,
                                                              1000)
            console.print(f"naive pipeline, one task per event: {naive_events:,} events …")
            report.figures["naive_task_per_event"] = pipeline_run(client, url, users,
                                                                  naive_events, 1)
            rate = report.figures["ours_spread"]["events_per_s"] / 2
            console.print(f"latency at half saturation ({rate:,.0f} events/s) …")
            report.figures["latency_half_saturation"] = latency_run(client, url, users, rate,
                                                                    latency_seconds)
    finally:
        stop_worker(worker)
    console.print(f"SQL baseline, one transaction per event: {baseline_events:,} events …")
    report.figures["sql_one_tx_per_event"] = sql_baseline(url, users, baseline_events)
    spread = report.figures["ours_spread"]["events_per_s"]
    report.ratios = {
        "spread_vs_sql_baseline": round(
            spread / report.figures["sql_one_tx_per_event"]["events_per_s"], 2),
        "one_account_vs_spread": round(
            report.figures["ours_one_account"]["events_per_s"] / spread, 2),
        "spread_vs_naive_pipeline": round(
            spread / report.figures["naive_task_per_event"]["events_per_s"], 2),
    }
    with session_factory(url).begin() as s:
        report.verify_ok = verify(s).ok
    dispose_engines(close=True)
    return report


BENCH_DIR = Path(__file__).resolve().parents[3] / "bench"


def harness(script: str, args: list[str], console: Console) -> dict[str, Any] | None:
    """Run one of the repository's bench/ harnesses and return the JSON it wrote."""
    path = BENCH_DIR / script
    if not path.exists():
        console.print(f"[yellow]{script} not found (bench/ ships with the repository)[/yellow]")
        return None
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        done = subprocess.run([sys.executable, str(path), *args, "--json", str(out)],
                              capture_output=True, text=True, timeout=1800)
        if done.returncode != 0 or not out.exists():
            console.print(f"[red]{script} failed:[/red] {done.stderr.strip()[-500:]}")
            return None
        return json.loads(out.read_text())


def run_harnesses(report: BenchReport, *, http_seconds: float, renewal_accounts: int,
                  console: Console) -> None:
    """Token-process start over HTTP and the renewal run, each measured by its harness."""
    if http_seconds > 0:
        console.print(f"token-process start over HTTP for {http_seconds:g} s …")
        http = harness("http_start.py", ["--seconds", str(http_seconds)], console)
        if http:
            report.figures["http_token_process_start"] = {
                "events": http.get("requests", 0), "seconds": http.get("seconds"),
                "req_per_s": http.get("rps"), "p50_ms": http.get("p50_ms"),
                "p99_ms": http.get("p99_ms")}
    if renewal_accounts > 0:
        console.print(f"monthly renewal of {renewal_accounts:,} accounts …")
        ren = harness("renewals.py", ["--accounts", str(renewal_accounts)], console)
        if ren:
            report.figures["renewal_run"] = {
                "events": ren.get("successful", 0), "seconds": ren.get("wall_seconds"),
                "events_per_s": ren.get("accounts_per_second"),
                "p99_ms": (ren.get("charges_during") or {}).get("p99_ms"),
                "live_charge_p99_ratio": ren.get("p99_ratio"),
                "write_floor_seconds": ren.get("write_floor_seconds"),
                "verify_ok": ren.get("verify_ok")}
            if ren.get("wall_to_floor"):
                # The run against the bare writes of the same accounts on the same machine,
                # in the same run: a figure that survives the machine's speed.
                report.ratios["renewal_to_write_floor"] = ren["wall_to_floor"]


def print_report(report: BenchReport, console: Console, json_path: Path | None) -> None:
    table = Table(title=f"tokenledger bench — {report.accounts:,} accounts")
    for col in ("measurement", "events", "seconds", "events/s", "p50 ms", "p99 ms"):
        table.add_column(col, justify="left" if col == "measurement" else "right")
    for name, f in report.figures.items():
        rate = f.get("events_per_s") or f.get("req_per_s")
        table.add_row(name, f"{f.get('events') or 0:,}", str(f.get("seconds", "")),
                      f"{rate:,.0f}" if rate else "",
                      str(f.get("p50_ms", "")), str(f.get("p99_ms", "")))
    console.print(table)
    for name, value in report.ratios.items():
        console.print(f"{name}: [bold]{value}×[/bold]")
    console.print(f"verify after the bench: {'OK' if report.verify_ok else 'MISMATCH'}")
    blob = json.dumps(report.as_dict(), indent=2)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(blob)
    print(blob)
