"""Monthly renewal of 1,000,000 accounts on PostgreSQL, through real workers, with live
charges flowing meanwhile.

    uv run python bench/renewals.py [--accounts 1000000] [--chunk-size 25000]

Creates a dedicated database (dropped afterwards unless --keep), fills it set-based with
``INSERT ... SELECT generate_series``, starts renewal workers on their own queue and one
charge worker on the main queue, measures the p99 of live charges (publish -> outcome
committed) idle and during the run, runs a monthly renewal, checks ``verify``, then
times the bare writes of the same renewal as a yardstick (``write_floor_seconds``).
Not part of the pytest suite: it loads the machine for about a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from tokenledger import LedgerClient, Settings  # noqa: E402
from tokenledger.db.engine import dispose_engines, session_factory  # noqa: E402
from tokenledger.db.migrate import migrate  # noqa: E402
from tokenledger.ledger.verify import verify  # noqa: E402
from tokenledger.renewals import runs as runner  # noqa: E402
from tokenledger.renewals.service import RunOptions  # noqa: E402

PG_ADMIN = os.environ.get("TOKENLEDGER_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS = os.environ.get("TOKENLEDGER_BENCH_REDIS", "redis://127.0.0.1:6379/0")


def fill(url: str, accounts: int) -> float:
    """1M accounts across the 30-day tiers, each due (last renewal 31 days ago)."""
    started = time.perf_counter()
    with session_factory(url).begin() as session:
        conn = session.connection()
        conn.exec_driver_sql(
            "INSERT INTO accounts (user_id, plan_code, timezone, created_at, last_renewal_at)"
            " SELECT 'bench-' || g,"
            "  (ARRAY['Gift', 'Professional', 'Business'])[1 + g %% 3], 'UTC',"
            "  now() - interval '31 days', now() - interval '31 days'"
            f" FROM generate_series(1, {accounts}) AS g")
        # Empty STANDARD wallets: a balance of 0 with no entries keeps verify clean.
        conn.exec_driver_sql(
            "INSERT INTO wallets (account_id, wallet_type, balance, is_active, created_at)"
            " SELECT id, 'STANDARD', 0, true, now() FROM accounts")
    with psycopg.connect(url.replace("+psycopg", ""), autocommit=True) as c:
        c.execute("VACUUM ANALYZE accounts")
        c.execute("VACUUM ANALYZE wallets")
    return time.perf_counter() - started


def start_worker(settings: Settings, queue: str, concurrency: int, log: Path
                 ) -> subprocess.Popen[bytes]:
    env = {**os.environ, "TOKENLEDGER_DATABASE_URL": settings.ledger_url(),
           "TOKENLEDGER_BROKER_URL": settings.broker_url, "TOKENLEDGER_QUEUE": settings.queue,
           "TOKENLEDGER_RENEWAL_QUEUE": settings.renewal_queue or settings.queue,
           "TOKENLEDGER_LOG_LEVEL": "WARNING"}
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tokenledger.queue.app", "worker", "-Q",
             queue, "-c", str(concurrency), "-l", "warning", "--without-gossip", "--without-mingle",
             "--without-heartbeat", "-n", f"bench-{uuid.uuid4().hex[:6]}@%h"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return proc


# The watcher looks for committed outcomes every 10 ms: a latency is up to 10 ms late.
# (Every 3 ms it made ~330 queries a second, which cost the machine a fifth of a core
# between the watcher and its database backend: load the renewal was measured under.)
POLL = 0.01


class LiveCharges:
    """Publishes one overdraft-allowed charge every ``interval`` seconds on random
    accounts, and watches for each outcome; latency = publish -> outcome committed."""

    def __init__(self, settings: Settings, accounts: int, interval: float) -> None:
        self.settings, self.accounts, self.interval = settings, accounts, interval
        self.published: dict[str, float] = {}
        self.seen: dict[str, float] = {}
        self.phase: dict[str, str] = {}
        self.pending: set[str] = set()
        self.current = "warmup"
        self.stop = threading.Event()
        self.lock = threading.Lock()

    def publish_loop(self) -> None:
        import random

        with LedgerClient(self.settings) as client:
            n = 0
            while not self.stop.is_set():
                user = f"bench-{random.randint(1, self.accounts)}"
                key = f"live-{n}"
                with self.lock:
                    self.published[key] = time.perf_counter()
                    self.phase[key] = self.current
                    self.pending.add(key)
                client.charge(user, amount=1, key=key, allow_overdraft=True)
                n += 1
                time.sleep(self.interval)

    def watch_loop(self) -> None:
        with psycopg.connect(self.settings.ledger_url().replace("+psycopg", ""),
                             autocommit=True) as conn:
            stopped_at: float | None = None
            while True:
                if self.stop.is_set():
                    stopped_at = stopped_at or time.perf_counter()
                    if time.perf_counter() - stopped_at > 30:
                        break  # charges still queued after the run are not measured
                with self.lock:
                    pending = list(self.pending)
                if pending:
                    rows = conn.execute("SELECT key FROM event_outcomes WHERE key = ANY(%s)",
                                        (pending,)).fetchall()
                    now = time.perf_counter()
                    with self.lock:
                        for (key,) in rows:
                            self.seen[key] = now
                            self.pending.discard(key)
                if self.stop.is_set() and not pending:
                    break
                time.sleep(POLL)

    def p99(self, phase: str) -> tuple[float, int]:
        lat = sorted((self.seen[k] - self.published[k]) * 1000 for k, p in self.phase.items()
                     if p == phase and k in self.seen)
        if not lat:
            return float("nan"), 0
        return lat[min(len(lat) - 1, int(len(lat) * 0.99))], len(lat)

    def median(self, phase: str) -> float:
        lat = [(self.seen[k] - self.published[k]) * 1000 for k, p in self.phase.items()
               if p == phase and k in self.seen]
        return statistics.median(lat) if lat else float("nan")


def write_floor(url: str, accounts: int, backends: int) -> float:
    """Seconds PostgreSQL needs for the bare writes of a renewal of every account, as a
    yardstick measured on the same machine in the same run: each of ``backends``
    connections locks its share of the accounts, marks them, adds to their STANDARD
    wallets and inserts their entries (the same table, indexes and checks), one statement
    each, then rolls back. No decisions, no slices, no notices, no workers."""
    dsn = url.replace("+psycopg", "")
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CHECKPOINT")
    share = -(-accounts // backends)
    statements = (
        "SELECT count(*) FROM (SELECT id FROM accounts WHERE id > %(lo)s AND id <= %(hi)s"
        " ORDER BY id FOR UPDATE) AS locked",
        "UPDATE accounts SET last_renewal_at = last_renewal_at + interval '30 days'"
        " WHERE id > %(lo)s AND id <= %(hi)s",
        "UPDATE wallets SET balance = balance + 100"
        " WHERE account_id > %(lo)s AND account_id <= %(hi)s AND wallet_type = 'STANDARD'",
        "INSERT INTO ledger_entries (account_id, wallet_id, amount, balance_before,"
        " balance_after, type, event_key, metadata, created_at)"
        " SELECT account_id, id, 100, balance - 100, balance, 'RENEWAL',"
        " 'floor:' || account_id, '{\"run\": 0, \"plan\": \"Gift\"}', now() FROM wallets"
        " WHERE account_id > %(lo)s AND account_id <= %(hi)s AND wallet_type = 'STANDARD'")
    conns = [psycopg.connect(dsn) for _ in range(backends)]

    def write(i: int) -> None:
        params = {"lo": i * share, "hi": (i + 1) * share}
        for sql in statements:
            conns[i].execute(sql, params)
        conns[i].rollback()

    try:
        with ThreadPoolExecutor(backends) as pool:
            started = time.perf_counter()
            list(pool.map(write, range(backends)))  # a failed write raises here
            return time.perf_counter() - started
    finally:
        for c in conns:
            c.close()


def wait_sealed(url: str, run_id: int, timeout: float) -> float:
    """perf_counter() when the run was seen sealed: one indexed read every 20 ms on one
    connection (a full report every 50 ms cost the machine a few percent of a core)."""
    deadline = time.perf_counter() + timeout
    with psycopg.connect(url.replace("+psycopg", ""), autocommit=True) as conn:
        while time.perf_counter() < deadline:
            row = conn.execute("SELECT finished_at FROM renewal_runs WHERE id = %s",
                               (run_id,)).fetchone()
            if row is not None and row[0] is not None:
                return time.perf_counter()
            time.sleep(0.02)
    raise TimeoutError(f"renewal run {run_id} still open after {timeout} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accounts", type=int, default=1_000_000)
    parser.add_argument("--chunk-size", type=int, default=25000)
    parser.add_argument("--renewal-concurrency", type=int, default=2)
    # One charge per message is about 100/s for one worker process: publishing faster
    # saturates it and the p99 measures its queue, not the renewal's effect on charges.
    parser.add_argument("--charge-interval", type=float, default=0.05)
    # At 20 charges/s, 15 s gives ~300 idle samples: fewer make the idle p99 one outlier.
    parser.add_argument("--idle-seconds", type=float, default=15)
    parser.add_argument("--keep", action="store_true", help="keep the database")
    parser.add_argument("--no-floor", action="store_true",
                        help="skip the bare-writes yardstick (write_floor_seconds)")
    parser.add_argument("--json", type=Path, help="also write the whole result here")
    args = parser.parse_args()

    name = f"tokenledger_bench_renewals_{os.getpid()}"
    admin = psycopg.connect(PG_ADMIN, autocommit=True)
    admin.execute(f'CREATE DATABASE "{name}"')
    url = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + "/" + name
    queue = f"bench-{os.getpid()}"
    settings = Settings(database_url=url, broker_url=REDIS, queue=queue,
                        renewal_queue=f"{queue}.renewals", log_json=False)
    logs = Path(f"/tmp/{name}")
    logs.mkdir(exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []
    result: dict[str, Any] = {"accounts": args.accounts, "chunk_size": args.chunk_size}
    try:
        migrate(url)
        result["fill_seconds"] = round(fill(url, args.accounts), 2)
        print(f"filled {args.accounts} accounts in {result['fill_seconds']} s", flush=True)
        procs.append(start_worker(settings, settings.renewal_queue or queue,
                                  args.renewal_concurrency, logs / "renewal-worker.log"))
        procs.append(start_worker(settings, queue, 1, logs / "charge-worker.log"))
        time.sleep(6)  # workers booting

        live = LiveCharges(settings, args.accounts, args.charge_interval)
        threads = [threading.Thread(target=live.publish_loop, daemon=True),
                   threading.Thread(target=live.watch_loop, daemon=True)]
        for t in threads:
            t.start()
        time.sleep(2)
        live.current = "idle"
        time.sleep(args.idle_seconds)

        live.current = "during"
        result["load_average_before"] = [round(x, 2) for x in os.getloadavg()]
        started = time.perf_counter()
        run_id, chunk_ids = runner.start_run(settings, RunOptions(
            "monthly", chunk_size=args.chunk_size, trigger="bench"))
        planned = time.perf_counter()
        runner.dispatch(settings, chunk_ids)
        finished = wait_sealed(url, run_id, timeout=600)
        report = runner.wait_for_run(settings, run_id, timeout=0)
        result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
        live.current = "after"
        time.sleep(1)
        live.stop.set()
        for t in threads:
            t.join(timeout=60)

        idle_p99, idle_n = live.p99("idle")
        during_p99, during_n = live.p99("during")
        result.update({
            "run_id": run_id, "status": report["status"], "chunks": report["total_chunks"],
            "successful": report["successful"], "failed": report["failed"],
            "tokens_granted": report["tokens_granted"],
            "plan_seconds": round(planned - started, 2),
            "wall_seconds": round(finished - started, 2),
            "accounts_per_second": round(report["successful"] / (finished - started)),
            "charges_idle": {"n": idle_n, "p50_ms": round(live.median("idle"), 1),
                             "p99_ms": round(idle_p99, 1)},
            "charges_during": {"n": during_n, "p50_ms": round(live.median("during"), 1),
                               "p99_ms": round(during_p99, 1)},
            "p99_ratio": round(during_p99 / idle_p99, 2) if idle_p99 else None,
        })
        print(json.dumps(result, indent=2), flush=True)
        vstart = time.perf_counter()
        with session_factory(url).begin() as session:
            v = verify(session)
            entries = session.connection().exec_driver_sql(
                "SELECT count(*) FROM ledger_entries WHERE type = 'RENEWAL'").scalar()
        result["verify_ok"] = v.ok
        result["renewal_entries"] = entries
        result["verify_seconds"] = round(time.perf_counter() - vstart, 1)
        print(json.dumps({k: result[k] for k in ("verify_ok", "renewal_entries",
                                                 "verify_seconds")}), flush=True)
        if not args.no_floor:
            floor = write_floor(url, args.accounts, args.renewal_concurrency)
            result["write_floor_seconds"] = round(floor, 2)
            result["wall_to_floor"] = round(result["wall_seconds"] / floor, 2)
            print(json.dumps({k: result[k] for k in ("write_floor_seconds",
                                                     "wall_to_floor")}), flush=True)
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
        r.delete(queue, f"{queue}.renewals")
        r.close()


if __name__ == "__main__":
    main()
