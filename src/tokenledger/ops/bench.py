"""``tokenledger bench``: the pipeline measured on PostgreSQL + Redis, beside a lean baseline.

Every figure is a ratio measured in one run on one machine (absolute speed moves 2-3x on a
shared 2-core machine). The baseline is what a competent team writes by hand: psycopg,
8 threads, one transaction per event of four statements (insert the idempotency key, lock
the wallet, update it, insert the entry) and the commit.

Measured, each phase ending with its outcomes counted (zero lost, zero applied twice) and
``verify`` clean:

- single events (``client.charge`` per event) from 8 threads of one process, and from 8
  processes of one thread, to 2 worker processes; worker CPU per event;
- ``publish_many`` spread over every account, and every event on one account;
- publish -> committed latency at half of single-event saturation;
- good throughput with 5 % poison messages against a clean run;
- events/s against producer threads (single, batched, baseline) for the plot;
- token-process start over HTTP, and a monthly renewal of 1M accounts (live charges' p99
  during it, and its wall time against the same run's bare-write floor) by the harnesses
  in ``bench/``.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from rich.console import Console
from rich.table import Table

from tokenledger.config import Settings
from tokenledger.db.engine import dispose_engines
from tokenledger.db.migrate import migrate
from tokenledger.ops.demo import start_worker, stop_worker

START_BALANCE = 1_000_000_000
THREADS = 8
WORKER_PROCESSES = 2


@dataclass
class Target:
    """One row of the table: a measured figure beside its target."""

    name: str
    value: float | None
    target: str
    ok: bool | None
    unit: str = "x"


@dataclass
class BenchReport:
    accounts: int
    started_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    machine: dict[str, Any] = field(default_factory=lambda: {
        "cpus": os.cpu_count(), "python": sys.version.split()[0]})
    figures: dict[str, dict[str, Any]] = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)
    sweep: dict[str, dict[int, float]] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("latencies_ms")
        return out


# -- the database ------------------------------------------------------------------------


def fresh_database(admin_url: str, name: str) -> str:
    """Drop and create ``name``; returns its SQLAlchemy URL."""
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}"')
    base = admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    return f"{base}/{name}"


def dsn(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def seed_accounts(url: str, n: int) -> None:
    """Open ``n`` accounts set-based, each with one funded STANDARD wallet (verify-clean)."""
    with psycopg.connect(dsn(url)) as conn:
        conn.execute(
            "INSERT INTO accounts (user_id, plan_code, timezone, created_at, last_renewal_at,"
            " last_reset_on) SELECT 'b' || g, 'Business', 'UTC', now(), now(),"
            " to_char(now(), 'YYYY-MM-DD') FROM generate_series(1, %s) g", (n,))
        conn.execute(
            "INSERT INTO wallets (account_id, wallet_type, balance, is_active, created_at)"
            " SELECT id, 'STANDARD', %s, true, now() FROM accounts", (START_BALANCE,))
        conn.execute(
            "INSERT INTO event_outcomes (key, payload_hash, user_id, event_type, outcome,"
            " result, created_at) SELECT 'open:' || user_id, 'bench', user_id,"
            " 'open_account', 'applied', '{}', now() FROM accounts")
        conn.execute(
            "INSERT INTO ledger_entries (account_id, wallet_id, amount, balance_before,"
            " balance_after, type, event_key, created_at) SELECT w.account_id, w.id, %s, 0,"
            " %s, 'OPEN', 'open:' || a.user_id, now() FROM wallets w"
            " JOIN accounts a ON a.id = w.account_id", (START_BALANCE, START_BALANCE))
    with psycopg.connect(dsn(url), autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")


def settle(url: str, prefix: str, total: int, timeout: float = 900) -> float:
    """Wait until ``total`` events of ``prefix`` have an outcome; the moment it happened."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(dsn(url), autocommit=True) as conn:
        while True:
            done = conn.execute("SELECT count(*) FROM event_outcomes WHERE key LIKE %s",
                                (prefix + "%",)).fetchone()[0]
            if done >= total:
                return time.monotonic()
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {done} of {total} events of {prefix} settled")
            time.sleep(0.005)


def check(url: str, prefix: str, expected: int) -> dict[str, Any]:
    """Outcomes and entries of a phase: nothing lost, nothing applied twice."""
    with psycopg.connect(dsn(url)) as conn:
        outcomes = conn.execute("SELECT count(*) FROM event_outcomes WHERE key LIKE %s",
                                (prefix + "%",)).fetchone()[0]
        entries, keys = conn.execute(
            "SELECT count(*), count(DISTINCT event_key) FROM ledger_entries"
            " WHERE event_key LIKE %s", (prefix + "%",)).fetchone()
    return {"expected": expected, "final": outcomes, "lost": expected - outcomes,
            "doubled": entries - keys}


def verify_clean(url: str) -> bool:
    from tokenledger.db.engine import session_factory
    from tokenledger.ledger.verify import verify

    with session_factory(url).begin() as s:
        return verify(s).ok


# -- the lean baseline -------------------------------------------------------------------


def lean_baseline(url: str, users: list[str], n: int, threads: int = THREADS) -> float:
    """One transaction per event from ``threads`` threads: insert the key, lock the
    wallet, update it, insert the entry, commit. Events/s."""
    prefix = f"s{uuid.uuid4().hex[:6]}-"
    per = [list(range(i, n, threads)) for i in range(threads)]
    barrier = threading.Barrier(threads + 1)

    def run(indexes: list[int]) -> None:
        with psycopg.connect(dsn(url)) as conn:
            barrier.wait()
            for i in indexes:
                key, user = f"{prefix}{i}", users[(i * 7919) % len(users)]
                with conn.transaction():
                    conn.execute(
                        "INSERT INTO event_outcomes (key, payload_hash, user_id, event_type,"
                        " outcome, result, created_at) VALUES (%s, 'x', %s, 'charge',"
                        " 'applied', '{}', now())", (key, user))
                    wallet, account, balance = conn.execute(
                        "SELECT w.id, w.account_id, w.balance FROM wallets w JOIN accounts a"
                        " ON a.id = w.account_id WHERE a.user_id = %s"
                        " AND w.wallet_type = 'STANDARD' FOR UPDATE OF w", (user,)).fetchone()
                    conn.execute("UPDATE wallets SET balance = balance - 1 WHERE id = %s",
                                 (wallet,))
                    conn.execute(
                        "INSERT INTO ledger_entries (account_id, wallet_id, amount,"
                        " balance_before, balance_after, type, event_key, created_at)"
                        " VALUES (%s, %s, -1, %s, %s, 'CHARGE', %s, now())",
                        (account, wallet, balance, balance - 1, key))

    pool = [threading.Thread(target=run, args=(p,)) for p in per]
    for t in pool:
        t.start()
    barrier.wait()
    started = time.monotonic()
    for t in pool:
        t.join()
    return n / (time.monotonic() - started)


# -- the pipeline ------------------------------------------------------------------------


class WorkerCpu:
    """CPU seconds used by a worker's main process and its pool (psutil)."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.root = psutil.Process(pid)

    def seconds(self) -> float:
        import psutil

        total = 0.0
        for proc in [self.root, *self.root.children(recursive=True)]:
            try:
                t = proc.cpu_times()
            except psutil.Error:
                continue
            total += t.user + t.system
        return total


def single_events(settings: Settings, url: str, users: list[str], n: int,
                  threads: int = THREADS, rate: float | None = None,
                  poison_every: int = 0,
                  watcher: CommitWatcher | None = None) -> dict[str, Any]:
    """``n`` single-event charges from ``threads`` threads of one process sharing one
    client (``rate``: paced, events/s in all). With ``poison_every``, one message in that
    many more is a poison message (not counted). Events/s published -> committed, and each
    event's publish time (for latency)."""
    from tokenledger.sdk.client import LedgerClient

    prefix = f"t{uuid.uuid4().hex[:6]}-"
    sent: dict[str, float] = {}
    barrier = threading.Barrier(threads + 1)
    gap = threads / rate if rate else 0.0
    poison = 0
    with LedgerClient(settings) as client:
        client.producer  # connect before the clock starts  # noqa: B018

        def run(t: int) -> None:
            nonlocal poison
            barrier.wait()
            begin = time.monotonic()
            for j, i in enumerate(range(t, n, threads)):
                key = f"{prefix}{i}"
                sent[key] = time.time()
                if watcher is not None:
                    watcher.sent(key)
                client.charge(users[(i * 7919) % len(users)], amount=1, key=key)
                if poison_every and i % poison_every == 0:
                    client.producer.publish_events({"type": "charge", "key": f"x{key}",
                                                    "user_id": users[0], "amount": 2**70})
                    poison += 1
                if gap:
                    time.sleep(max(0.0, begin + (j + 1) * gap - time.monotonic()))

        pool = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
        for t in pool:
            t.start()
        barrier.wait()
        started = time.monotonic()
        for t in pool:
            t.join()
        published = time.monotonic()
    finished = settle(url, prefix, n)
    return {"prefix": prefix, "events": n, "events_per_s": n / (finished - started),
            "publish_per_s": n / (published - started), "sent": sent, "poison": poison}


def _process_producer(settings_json: str, users: list[str], prefix: str, indexes: list[int],
                      start_at: float) -> None:
    from tokenledger.sdk.client import LedgerClient

    settings = Settings.model_validate_json(settings_json)
    with LedgerClient(settings) as client:
        client.producer  # noqa: B018
        time.sleep(max(0.0, start_at - time.time()))
        for i in indexes:
            client.charge(users[(i * 7919) % len(users)], amount=1, key=f"{prefix}{i}")


def single_events_processes(settings: Settings, url: str, users: list[str], n: int,
                            processes: int = THREADS) -> dict[str, Any]:
    """``n`` single-event charges from ``processes`` producer processes of one thread."""
    prefix = f"q{uuid.uuid4().hex[:6]}-"
    ctx = multiprocessing.get_context("spawn")
    start_at = time.time() + 4  # every process imported and connected by then
    procs = [ctx.Process(target=_process_producer, args=(
        settings.model_dump_json(), users, prefix, list(range(p, n, processes)), start_at))
        for p in range(processes)]
    for p in procs:
        p.start()
    time.sleep(max(0.0, start_at - time.time()))
    started = time.monotonic()
    for p in procs:
        p.join()
    finished = settle(url, prefix, n)
    return {"prefix": prefix, "events": n, "events_per_s": n / (finished - started)}


def batched(settings: Settings, url: str, users: list[str], n: int, threads: int = 1,
            per_message: int = 1000) -> dict[str, Any]:
    """``publish_many`` in messages of ``per_message`` from ``threads`` threads."""
    from tokenledger.sdk.client import LedgerClient

    prefix = f"m{uuid.uuid4().hex[:6]}-"
    events = [{"type": "charge", "key": f"{prefix}{i}", "user_id": users[(i * 7919)
               % len(users)], "amount": 1} for i in range(n)]
    chunks = [events[i:i + per_message] for i in range(0, n, per_message)]
    with LedgerClient(settings) as client:
        client.producer  # noqa: B018
        started = time.monotonic()
        pool = [threading.Thread(target=lambda t=t: [client.publish_many(c)
                                                     for c in chunks[t::threads]])
                for t in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
    finished = settle(url, prefix, n)
    return {"prefix": prefix, "events": n, "events_per_s": n / (finished - started)}


class CommitWatcher:
    """When each published key became visible to another connection (its group committed):
    a thread asks every ``interval`` seconds for the keys still pending, so a latency reads
    at most ``interval`` plus one query late. Its few hundred small queries a second are
    part of the load measured."""

    def __init__(self, url: str, interval: float = 0.002) -> None:
        self.url = url
        self.interval = interval
        self.pending: set[str] = set()
        self.seen: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sent(self, key: str) -> None:
        with self._lock:
            self.pending.add(key)

    def _run(self) -> None:
        with psycopg.connect(dsn(self.url), autocommit=True) as conn:
            while not (self._stop.is_set() and not self.pending):
                with self._lock:
                    keys = list(self.pending)
                if keys:
                    rows = conn.execute("SELECT key FROM event_outcomes WHERE key = ANY(%s)",
                                        (keys,)).fetchall()
                    now = time.time()
                    with self._lock:
                        for (key,) in rows:
                            self.pending.discard(key)
                            self.seen[key] = now
                time.sleep(self.interval)

    def __enter__(self) -> CommitWatcher:
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=120)

    def latencies(self, sent: dict[str, float]) -> list[float]:
        """publish -> committed per event, ms, sorted."""
        return sorted((self.seen[k] - t) * 1000 for k, t in sent.items() if k in self.seen)


def pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(len(values) * q))] if values else float("nan")


# -- the run -----------------------------------------------------------------------------


def run_bench(*, admin_url: str, broker_url: str, accounts: int = 100_000,
              single: int = 20_000, batch_events: int = 300_000, baseline_events: int = 10_000,
              latency_seconds: float = 15, sweep: bool = True,
              console: Console | None = None) -> BenchReport:
    """Every pipeline measurement in one go on a fresh database ``tokenledger_bench``."""
    console = console or Console()
    url = fresh_database(admin_url, "tokenledger_bench")
    migrate(url)
    console.print(f"seeding {accounts:,} accounts …")
    seed_accounts(url, accounts)
    settings = Settings(database_url=url, broker_url=broker_url,
                        queue=f"tlbench-{uuid.uuid4().hex[:6]}")
    report = BenchReport(accounts=accounts)
    users = [f"b{i}" for i in range(1, accounts + 1)]
    f = report.figures

    def phase(name: str, result: dict[str, Any], expected: int | None = None) -> None:
        report.checks[name] = check(url, result["prefix"], expected or result["events"])
        f[name] = {k: round(v, 1) if isinstance(v, float) else v for k, v in result.items()
                   if k not in ("sent", "prefix")}

    console.print(f"lean baseline, {THREADS} threads: {baseline_events:,} events …")
    f["lean_baseline"] = {"events": baseline_events, "events_per_s": round(
        lean_baseline(url, users, baseline_events), 1)}
    log = Path(tempfile.gettempdir()) / "tokenledger-bench-worker.log"
    worker = start_worker(settings, log, concurrency=WORKER_PROCESSES)
    cpu = WorkerCpu(worker.pid)
    try:
        batched(settings, url, users, 20_000)  # warm up pools, caches, prepared plans
        single_events(settings, url, users, 2_000)
        console.print(f"single events, {THREADS} threads: {single:,} …")
        before = cpu.seconds()
        result = single_events(settings, url, users, single)
        f_cpu = (cpu.seconds() - before) / single * 1000
        phase("single_8_threads", result)
        f["single_8_threads"]["worker_cpu_ms_per_event"] = round(f_cpu, 3)
        saturation = result["events_per_s"]

        console.print(f"single events, {THREADS} processes: {single:,} …")
        phase("single_8_processes", single_events_processes(settings, url, users, single))

        console.print(f"publish_many over {accounts:,} accounts: {batch_events:,} …")
        phase("batched_spread", batched(settings, url, users, batch_events))
        console.print("publish_many, every event on one account …")
        phase("batched_one_account", batched(settings, url, users[:1], batch_events // 2))

        rate = saturation / 2
        n = int(rate * latency_seconds)
        console.print(f"latency at half of single-event saturation ({rate:,.0f}/s) …")
        with CommitWatcher(url) as watcher:
            result = single_events(settings, url, users, n, rate=rate, watcher=watcher)
            settle(url, result["prefix"], n)
        phase("latency_half_saturation", result)
        report.latencies_ms = watcher.latencies(result["sent"])
        lat = report.latencies_ms
        f["latency_half_saturation"].update(p50_ms=round(pct(lat, 0.5), 1),
                                            p99_ms=round(pct(lat, 0.99), 1),
                                            mean_ms=round(statistics.fmean(lat), 1))

        console.print("5 % poison among single events, against a clean run …")
        clean = single_events(settings, url, users, single // 2)
        phase("clean_run", clean)
        poisoned = single_events(settings, url, users, single // 2, poison_every=20)
        phase("poisoned_run", poisoned)

        if sweep:
            console.print("events/s against producer threads …")
            report.sweep = {"single": {}, "batched": {}, "lean_baseline": {}}
            for threads in (1, 2, 4, 8, 16):
                r = single_events(settings, url, users, 1_500 * min(threads, 4) + 1_000,
                                  threads=threads)
                report.checks[f"sweep_single_{threads}"] = check(url, r["prefix"], r["events"])
                report.sweep["single"][threads] = round(r["events_per_s"], 1)
                r = batched(settings, url, users, 40_000, threads=threads)
                report.checks[f"sweep_batched_{threads}"] = check(url, r["prefix"],
                                                                  r["events"])
                report.sweep["batched"][threads] = round(r["events_per_s"], 1)
                report.sweep["lean_baseline"][threads] = round(
                    lean_baseline(url, users, 3_000, threads=threads), 1)
    finally:
        stop_worker(worker)
    report.checks["verify"] = {"ok": verify_clean(url)}
    dispose_engines(close=True)
    return report


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def score(report: BenchReport) -> None:
    """The table's rows: each figure as a same-run ratio beside its target."""
    f = report.figures
    base = f.get("lean_baseline", {}).get("events_per_s")

    def rate(name: str) -> float | None:
        return f.get(name, {}).get("events_per_s")

    def row(name: str, value: float | None, target: str, good: Callable[[float], bool],
            unit: str = "x") -> None:
        report.targets.append(Target(name, value, target, None if value is None
                                     else good(value), unit))

    row("single events, 8 threads vs lean baseline", _ratio(rate("single_8_threads"), base),
        ">= 5x", lambda v: v >= 5)
    row("single events, 8 processes vs lean baseline",
        _ratio(rate("single_8_processes"), base), ">= 1.5x", lambda v: v >= 1.5)
    row("worker CPU per single event", f.get("single_8_threads", {}).get(
        "worker_cpu_ms_per_event"), "<= 1 ms", lambda v: v <= 1, "ms")
    row("publish_many spread, events/s", rate("batched_spread"), ">= 25,000/s",
        lambda v: v >= 25_000, "/s")
    row("publish_many spread vs lean baseline", _ratio(rate("batched_spread"), base),
        ">= 12x", lambda v: v >= 12)
    row("one account vs spread", _ratio(rate("batched_one_account"), rate("batched_spread")),
        ">= 0.8x", lambda v: v >= 0.8)
    lat = f.get("latency_half_saturation", {})
    row("latency p50 at half saturation", lat.get("p50_ms"), "<= 10 ms", lambda v: v <= 10,
        "ms")
    row("latency p99 at half saturation", lat.get("p99_ms"), "<= 50 ms", lambda v: v <= 50,
        "ms")
    row("good throughput with 5 % poison vs clean",
        _ratio(rate("poisoned_run"), rate("clean_run")), ">= 0.9x", lambda v: v >= 0.9)
    ren = f.get("renewal_run", {})
    row("live charge p99 during 1M renewal vs idle", ren.get("live_charge_p99_ratio"),
        "<= 3x", lambda v: v <= 3)
    row("1M renewal wall vs bare-write floor", ren.get("wall_to_floor"), "<= 1.5x",
        lambda v: v <= 1.5)


# -- harnesses, output -------------------------------------------------------------------

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
                              capture_output=True, text=True, timeout=3600)
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
                "idle_p99_ms": (ren.get("charges_idle") or {}).get("p99_ms"),
                "live_charge_p99_ratio": ren.get("p99_ratio"),
                "write_floor_seconds": ren.get("write_floor_seconds"),
                "wall_to_floor": ren.get("wall_to_floor"),
                "verify_ok": ren.get("verify_ok")}


def plot(report: BenchReport, out_dir: Path) -> list[Path]:
    """Two PNGs: events/s against producer threads, and the latency distribution."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made: list[Path] = []
    if report.sweep:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        labels = {"single": "single events (client.charge)",
                  "batched": "publish_many (1,000 per message)",
                  "lean_baseline": "lean SQL baseline (1 tx per event)"}
        for name, points in report.sweep.items():
            xs = sorted(int(k) for k in points)
            ax.plot(xs, [points[k] for k in xs], marker="o", label=labels.get(name, name))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("producer threads")
        ax.set_ylabel("events/s, published → committed")
        ax.set_title(f"tokenledger bench, {report.machine['cpus']} cores, "
                     f"{WORKER_PROCESSES} worker processes")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / "throughput.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)
    if report.latencies_ms:
        lat = report.latencies_ms
        fig, ax = plt.subplots(figsize=(7, 4.2))
        ax.hist(lat, bins=80, range=(0, max(1.0, pct(lat, 0.995))), color="#4477aa")
        for q, style in ((0.5, "--"), (0.99, ":")):
            ax.axvline(pct(lat, q), color="black", linestyle=style,
                       label=f"p{int(q * 100)} {pct(lat, q):.1f} ms")
        rate = report.figures.get("latency_half_saturation", {}).get("events", 0)
        ax.set_xlabel("publish → committed, ms")
        ax.set_ylabel("events")
        ax.set_title(f"latency at half of single-event saturation ({rate:,} events)")
        ax.legend()
        fig.tight_layout()
        path = out_dir / "latency.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)
    return made


def print_report(report: BenchReport, console: Console, out_dir: Path | None) -> None:
    score(report)
    table = Table(title=f"tokenledger bench — {report.accounts:,} accounts, "
                        f"{report.machine['cpus']} cores")
    for col in ("measurement", "measured", "target", ""):
        table.add_column(col, justify="left" if col == "measurement" else "right")
    for t in report.targets:
        shown = "—" if t.value is None else (f"{t.value:,.0f}{t.unit}" if t.unit == "/s"
                                            else f"{t.value:g} {t.unit}".replace(" x", "×"))
        mark = "" if t.ok is None else ("[green]met[/green]" if t.ok else "[red]missed[/red]")
        table.add_row(t.name, shown, t.target.replace("x", "×"), mark)
    console.print(table)
    figures = Table(title="figures (same run)")
    for col in ("phase", "events", "events/s", "p50 ms", "p99 ms", "lost", "doubled"):
        figures.add_column(col, justify="left" if col == "phase" else "right")
    for name, fig in report.figures.items():
        rate = fig.get("events_per_s") or fig.get("req_per_s")
        c = report.checks.get(name, {})
        figures.add_row(name, f"{fig.get('events') or 0:,}", f"{rate:,.0f}" if rate else "",
                        str(fig.get("p50_ms", "")), str(fig.get("p99_ms", "")),
                        str(c.get("lost", "")), str(c.get("doubled", "")))
    console.print(figures)
    bad = {k: v for k, v in report.checks.items() if v.get("lost") or v.get("doubled")}
    ok = report.checks.get("verify", {}).get("ok")
    console.print(f"verify: {'clean' if ok else 'NOT CLEAN'}; lost or doubled: "
                  f"{bad or 'none'}")
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        stamp = report.started_at[:19].replace(":", "").replace("-", "")
        blob = json.dumps(report.as_dict(), indent=2, default=str)
        (out_dir / f"{stamp}.json").write_text(blob)
        (out_dir / "latest.json").write_text(blob)
        for path in plot(report, out_dir):
            console.print(f"wrote {path}")
        console.print(f"wrote {out_dir / (stamp + '.json')}")
