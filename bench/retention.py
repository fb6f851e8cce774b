"""Retention on 1,000,000 entries: a compaction beside live charges, with verify and
balances as of past moments checked before and after.

    uv run python bench/retention.py [--accounts 10000] [--entries 100] [--days 500]
                                     [--older-than 100] [--chunk-size 500]

Creates a dedicated database (dropped afterwards unless --keep), fills it set-based with
``--accounts`` accounts of ``--entries`` credits each (one STANDARD wallet, an outcome per
entry) spread evenly over ``--days`` days, starts one charge worker and publishes live
charges on random accounts (publish -> outcome committed, idle and during), compacts
everything older than ``--older-than`` days, and reports the compaction's wall time,
entries archived per second, the outcomes pruned, ``verify`` before and after (and its
time), and whether balances as of sample moments from the cut-off on are unchanged.
``--small`` is a quick run without workers (the test suite's). Not part of the pytest
suite otherwise: it loads the machine for a few minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from bench.renewals import LiveCharges, start_worker  # noqa: E402
from tokenledger import Settings  # noqa: E402
from tokenledger.db.engine import dispose_engines, session_factory  # noqa: E402
from tokenledger.db.migrate import migrate  # noqa: E402
from tokenledger.db.uow import unit_of_work  # noqa: E402
from tokenledger.ledger.reports import balance_as_of  # noqa: E402
from tokenledger.ledger.verify import verify  # noqa: E402
from tokenledger.retention.compaction import compact  # noqa: E402
from tokenledger.timeutil import utcnow  # noqa: E402

PG_ADMIN = os.environ.get("TOKENLEDGER_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS = os.environ.get("TOKENLEDGER_BENCH_REDIS", "redis://127.0.0.1:6379/0")


def fill(url: str, accounts: int, entries: int, days: int) -> float:
    """``accounts`` accounts (user ids ``bench-<id>``) with one STANDARD wallet each and
    ``entries`` credits of 1, evenly dated over the last ``days`` days, each with its
    outcome: a ledger verify finds clean."""
    started = time.perf_counter()
    span = f"interval '{int(days)} days'"
    with session_factory(url).begin() as session:
        conn = session.connection()
        first = conn.exec_driver_sql("SELECT coalesce(max(id), 0) FROM accounts").scalar()
        conn.exec_driver_sql(
            "INSERT INTO accounts (user_id, plan_code, timezone, created_at, last_renewal_at)"
            f" SELECT 'bench-' || ({first} + g), 'Business', 'UTC', now() - {span}, now()"
            f" FROM generate_series(1, {int(accounts)}) AS g")
        conn.exec_driver_sql(
            "INSERT INTO wallets (account_id, wallet_type, balance, is_active, created_at)"
            f" SELECT id, 'STANDARD', {int(entries)}, true, now() - {span} FROM accounts"
            f" WHERE id > {first}")
        conn.exec_driver_sql(
            "INSERT INTO ledger_entries (account_id, wallet_id, amount, balance_before,"
            " balance_after, type, event_key, metadata, created_at)"
            " SELECT w.account_id, w.id, 1, k - 1, k, 'CREDIT', 'e-' || w.account_id || '-' || k,"
            f" '{{\"reason\": \"bench\"}}', now() - {span} + k * {span} / {int(entries) + 1}"
            f" FROM wallets AS w, generate_series(1, {int(entries)}) AS k"
            f" WHERE w.account_id > {first} ORDER BY w.account_id, k")
        conn.exec_driver_sql(
            "INSERT INTO event_outcomes (key, payload_hash, user_id, event_type, outcome,"
            " result, created_at) SELECT e.event_key, 'bench', a.user_id, 'credit', 'applied',"
            " '{}', e.created_at FROM ledger_entries AS e JOIN accounts AS a"
            f" ON a.id = e.account_id WHERE e.account_id > {first}")
    with psycopg.connect(url.replace("+psycopg", ""), autocommit=True) as c:
        for table in ("accounts", "wallets", "ledger_entries", "event_outcomes"):
            c.execute(f"VACUUM ANALYZE {table}")
    return time.perf_counter() - started


def timed_verify(settings: Settings) -> tuple[bool, float]:
    started = time.perf_counter()
    with session_factory(settings.ledger_url()).begin() as session:
        ok = verify(session).ok
    return ok, round(time.perf_counter() - started, 2)


def measure(settings: Settings, older_than_days: int, chunk_size: int,
            sample_users: list[str], on_chunk: Any = None) -> dict[str, Any]:
    """Verify, compact, verify again; balances of ``sample_users`` as of moments from the
    cut-off on, before and after (they must match)."""
    result: dict[str, Any] = {}
    now = utcnow()
    age = timedelta(days=older_than_days)
    moments = [now - age + timedelta(hours=1), now - age / 2, now - timedelta(minutes=1)]

    def balances() -> dict[tuple[str, str], int]:
        with unit_of_work(settings) as uow:
            return {(u, m.isoformat()): balance_as_of(uow.session, u, m).balance
                    for u in sample_users for m in moments}

    result["verify_before_ok"], result["verify_before_seconds"] = timed_verify(settings)
    before = balances()
    report = compact(settings, age, chunk_size=chunk_size, now=now, trigger="bench",
                     on_chunk=on_chunk)
    result.update({k: v for k, v in report.as_dict().items()
                   if k not in ("cutoff", "key_cutoff", "message", "dry_run")})
    result["entries_archived_per_second"] = (
        round(report.entries_archived / report.seconds) if report.seconds else None)
    result["verify_after_ok"], result["verify_after_seconds"] = timed_verify(settings)
    result["balances_as_of_unchanged"] = balances() == before
    with session_factory(settings.ledger_url()).begin() as session:
        conn = session.connection()
        result["entries_left"] = conn.exec_driver_sql(
            "SELECT count(*) FROM ledger_entries").scalar()
        result["archive_rows"] = conn.exec_driver_sql(
            "SELECT count(*) FROM ledger_entries_archive").scalar()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--entries", type=int, default=100, help="entries per account")
    parser.add_argument("--days", type=int, default=500, help="history spread over")
    parser.add_argument("--older-than", type=int, default=100, help="days")
    parser.add_argument("--chunk-size", type=int, default=500, help="accounts per chunk")
    parser.add_argument("--charge-interval", type=float, default=0.05)
    parser.add_argument("--idle-seconds", type=float, default=15)
    parser.add_argument("--small", action="store_true",
                        help="200 accounts x 20 entries, no worker and no live charges")
    parser.add_argument("--keep", action="store_true", help="keep the database")
    parser.add_argument("--json", type=Path, help="also write the whole result here")
    args = parser.parse_args()
    if args.small:
        args.accounts, args.entries = 200, 20

    name = f"tokenledger_bench_retention_{os.getpid()}"
    admin = psycopg.connect(PG_ADMIN, autocommit=True)
    admin.execute(f'CREATE DATABASE "{name}"')
    url = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + "/" + name
    queue = f"bench-{os.getpid()}"
    settings = Settings(database_url=url, broker_url=REDIS, queue=queue, log_json=False)
    logs = Path(f"/tmp/{name}")
    logs.mkdir(exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []
    result: dict[str, Any] = {"accounts": args.accounts, "entries_per_account": args.entries,
                              "days": args.days, "older_than_days": args.older_than,
                              "chunk_size": args.chunk_size}
    try:
        migrate(url)
        result["fill_seconds"] = round(fill(url, args.accounts, args.entries, args.days), 2)
        print(f"filled {args.accounts * args.entries} entries in {result['fill_seconds']} s",
              flush=True)
        rng = random.Random(19)
        sample = [f"bench-{rng.randint(1, args.accounts)}" for _ in range(20)]
        live = None
        if not args.small:
            procs.append(start_worker(settings, queue, 1, logs / "charge-worker.log"))
            time.sleep(6)  # the worker booting
            live = LiveCharges(settings, args.accounts, args.charge_interval)
            threads = [threading.Thread(target=live.publish_loop, daemon=True),
                       threading.Thread(target=live.watch_loop, daemon=True)]
            for t in threads:
                t.start()
            time.sleep(2)
            live.current = "idle"
            time.sleep(args.idle_seconds)
            live.current = "during"
        result.update(measure(settings, args.older_than, args.chunk_size, sample))
        if live is not None:
            live.current = "after"
            time.sleep(1)
            live.stop.set()
            for t in threads:
                t.join(timeout=60)
            idle_p99, idle_n = live.p99("idle")
            during_p99, during_n = live.p99("during")
            result["charges_idle"] = {"n": idle_n, "p50_ms": round(live.median("idle"), 1),
                                      "p99_ms": round(idle_p99, 1)}
            result["charges_during"] = {"n": during_n,
                                        "p50_ms": round(live.median("during"), 1),
                                        "p99_ms": round(during_p99, 1)}
            result["verify_after_live_ok"] = timed_verify(settings)[0]
        print(json.dumps(result, indent=2), flush=True)
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 15)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, 9)
        dispose_engines(close=True)
        if not args.keep:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()
        import redis

        r = redis.Redis.from_url(REDIS)
        r.delete(queue)
        r.close()


if __name__ == "__main__":
    main()
