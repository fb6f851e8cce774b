"""Token-process start over HTTP: requests per second and latency percentiles.

    uv run python bench/http_start.py [--seconds 10] [--connections 16] [--accounts 5000]

Creates a dedicated PostgreSQL database (dropped afterwards unless --keep), opens the
accounts, creates a producer key, starts the API with uvicorn (one process by default,
as ``tokenledger api`` runs it; uvloop/httptools when installed) on loopback, and drives
``POST /api/token-process/start``
from a separate load-generator process: keep-alive HTTP/1.1 connections on asyncio, each
sending the next request as soon as the previous answer arrived (closed loop), spread
over the accounts. Bounded in time (``--seconds`` after ``--warmup``) and in count
(``--max-requests``). Every answer is checked: a non-200 or a start that was not
``accessible`` counts as an error. Prints a table and JSON (``--json PATH`` writes it).

``run(...)`` returns the same figures as a dict, for ``tokenledger bench``.

    uv run python bench/http_start.py --roundtrips 200

counts instead, load-independently, what one start costs the database: libpq round trips
(client-to-server turns in a PQtrace of the connection) over that many sequential
in-process starts on the API server's start pool (``tokenprocess.pool.StartPool``), the path
the route and its fast path take.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

PG_ADMIN = os.environ.get("TOKENLEDGER_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS = os.environ.get("TOKENLEDGER_BENCH_REDIS", "redis://127.0.0.1:6379/0")
FEATURE = "project_creation"  # fixed cost 1: every start places a hold of 1 credit
TARGET_RPS = 2000
# One API process, as `tokenledger api` runs by default (docker-compose.yml runs two): a
# start costs it ~0.25-0.35 ms of CPU and PostgreSQL ~0.2-0.3 ms (starts run in groups),
# and its event loop is the bottleneck. uvicorn's workers share one listening socket, and
# the one that wakes first accepts a whole burst of keep-alive connections (16 of 16, or
# 15 of 16, in most runs), so a second one helps less than a core's worth: 2,571 / 2,248
# req/s with two against 2,268 / 1,963 with one, alternating, on 11-22.
WORKERS = 1
TARGET_P99_MS = 20.0


# -- setup -------------------------------------------------------------------------------


def prepare(url: str, accounts: int) -> str:
    """Migrate, open ``accounts`` Business accounts (10,000 credits each), make a key."""
    from tokenledger.apikeys.service import create_key
    from tokenledger.config import Settings
    from tokenledger.db.engine import session_factory
    from tokenledger.db.migrate import migrate
    from tokenledger.db.uow import unit_of_work
    from tokenledger.ledger.service import apply_events
    from tokenledger.messages import parse_event

    migrate(url)
    settings = Settings(database_url=url, broker_url=REDIS, notify_enabled=False)
    for start in range(0, accounts, 1000):
        events = [parse_event({"type": "open_account", "key": f"open:bench-{i}",
                               "user_id": f"bench-{i}", "plan": "Business"})
                  for i in range(start, min(accounts, start + 1000))]
        with unit_of_work(settings) as uow:
            apply_events(uow, events)
    with session_factory(url).begin() as session:
        key = create_key(session, "producer", "bench").key
    with psycopg.connect(url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
    return key


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_api(url: str, broker: str, port: int, workers: int, log: Path
              ) -> subprocess.Popen[bytes]:
    import importlib.util

    env = {**os.environ, "TOKENLEDGER_DATABASE_URL": url, "TOKENLEDGER_BROKER_URL": broker,
           "TOKENLEDGER_QUEUE": f"bench-http-{uuid.uuid4().hex[:6]}",
           "TOKENLEDGER_LOG_LEVEL": "WARNING"}
    fast = importlib.util.find_spec("uvloop") is not None
    argv = [sys.executable, "-m", "uvicorn", "tokenledger.api:app_from_env", "--factory",
            "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
            "--log-level", "warning", "--no-access-log", "--timeout-worker-healthcheck", "30",
            "--loop", "uvloop" if fast else "asyncio",
            "--http", "httptools" if importlib.util.find_spec("httptools") else "h11"]
    with log.open("ab") as out:
        return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def wait_ready(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the API exited early")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the API did not become ready")


# -- the load generator (runs in its own process) --------------------------------------------


class _Conn:
    """One keep-alive HTTP/1.1 connection sending pre-built POST requests."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def post(self, request: bytes) -> tuple[int, bytes]:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        body = await self.reader.readexactly(length)
        return status, body


def _request(port: int, key: str, user: str, probe: bool = False) -> bytes:
    if probe:  # the HTTP stack alone: no auth, no database
        return f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    body = json.dumps({"user_id": user, "feature_endpoint_id": FEATURE}).encode()
    return (f"POST /api/token-process/start HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"x-server-api-key: {key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def _drive(port: int, key: str, accounts: int, connections: int, warmup: float,
                 seconds: float, max_requests: int, probe: bool = False) -> dict[str, Any]:
    requests = [_request(port, key, f"bench-{i}", probe) for i in range(accounts)]
    latencies: list[float] = []
    errors: dict[str, int] = {}
    loop = asyncio.get_running_loop()
    start_at = loop.time() + warmup
    stop_at = start_at + seconds

    async def client(n: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        conn = _Conn(reader, writer)
        i = n
        try:
            while True:
                now = loop.time()
                if now >= stop_at or len(latencies) >= max_requests:
                    return
                t0 = time.perf_counter()
                status, body = await conn.post(requests[i % accounts])
                elapsed = time.perf_counter() - t0
                i += connections
                if now < start_at:
                    continue  # warm-up: not measured
                if status != 200:
                    errors[f"http {status}"] = errors.get(f"http {status}", 0) + 1
                elif not probe and b'"status":"accessible"' not in body:
                    errors["not accessible"] = errors.get("not accessible", 0) + 1
                latencies.append(elapsed)
        finally:
            writer.close()

    began = time.perf_counter()
    await asyncio.gather(*(client(n) for n in range(connections)))
    measured = min(seconds, time.perf_counter() - began - warmup)
    latencies.sort()

    def pct(p: float) -> float:
        return round(1000 * latencies[min(len(latencies) - 1, int(p * len(latencies)))], 3) \
            if latencies else 0.0

    return {"requests": len(latencies), "seconds": round(measured, 3),
            "rps": round(len(latencies) / measured, 1) if measured > 0 else 0.0,
            "p50_ms": pct(0.50), "p90_ms": pct(0.90), "p99_ms": pct(0.99),
            "max_ms": round(1000 * latencies[-1], 3) if latencies else 0.0,
            "errors": errors, "connections": connections}


def loadgen_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    for name in ("port", "accounts", "connections", "max-requests"):
        p.add_argument(f"--{name}", type=int, required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--warmup", type=float, required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--probe", action="store_true")
    a = p.parse_args(argv)
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    result = runner(_drive(a.port, a.key, a.accounts, a.connections, a.warmup, a.seconds,
                           a.max_requests, a.probe))
    sys.stdout.write(json.dumps(result) + "\n")


# -- the run ---------------------------------------------------------------------------------


def run(*, admin_url: str = PG_ADMIN, broker_url: str = REDIS, accounts: int = 5000,
        seconds: float = 10.0, warmup: float = 2.0, connections: int = 16,
        max_requests: int = 200_000, workers: int = WORKERS, keep: bool = False,
        log_dir: Path | None = None, probe_seconds: float = 3.0) -> dict[str, Any]:
    """Measure token-process start over HTTP; returns req/s, percentiles and errors.

    With ``probe_seconds`` it first measures ``GET /healthz`` the same way: the HTTP
    stack's own ceiling on this machine, to tell it apart from the start's transaction.
    """
    from tokenledger.db.engine import dispose_engines

    name = f"tokenledger_bench_http_{os.getpid()}_{uuid.uuid4().hex[:4]}"
    admin = psycopg.connect(admin_url, autocommit=True, connect_timeout=5)
    admin.execute(f'CREATE DATABASE "{name}"')
    url = admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + \
        f"/{name}"
    log = (log_dir or Path(tempfile.gettempdir())) / "tokenledger-bench-http.log"
    proc = None
    try:
        t0 = time.perf_counter()
        key = prepare(url, accounts)
        dispose_engines(close=True)
        setup = time.perf_counter() - t0
        port = free_port()
        proc = start_api(url, broker_url, port, workers, log)
        wait_ready(port, proc)

        def load(duration: float, *extra: str) -> dict[str, Any]:
            out = subprocess.run(
                [sys.executable, __file__, "--loadgen", "--port", str(port), "--key", key,
                 "--accounts", str(accounts), "--connections", str(connections),
                 "--max-requests", str(max_requests), "--warmup", str(warmup),
                 "--seconds", str(duration), *extra],
                capture_output=True, text=True, timeout=warmup + duration + 120, check=True)
            return json.loads(out.stdout.strip().splitlines()[-1])

        probe = load(probe_seconds, "--probe") if probe_seconds > 0 else None
        result = load(seconds)
        if probe is not None:
            result["healthz_rps"] = probe["rps"]
            result["healthz_p99_ms"] = probe["p99_ms"]
        result.update(workers=workers, accounts=accounts, setup_seconds=round(setup, 1),
                      target_rps=TARGET_RPS, target_p99_ms=TARGET_P99_MS,
                      meets_target=result["rps"] >= TARGET_RPS
                      and result["p99_ms"] <= TARGET_P99_MS and not result["errors"],
                      cpus=os.cpu_count())
        return result
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, 15)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
        if not keep:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


# -- round trips per start (load-independent) --------------------------------------------------


def count_roundtrips(*, admin_url: str = PG_ADMIN, starts: int = 200,
                     accounts: int = 50) -> dict[str, Any]:
    """Sequential starts on the API server's start pool, its connection traced by libpq."""
    import asyncio

    from tokenledger.config import Settings
    from tokenledger.messages import StartRequest
    from tokenledger.tokenprocess.pool import StartPool

    name = f"tokenledger_bench_rt_{os.getpid()}_{uuid.uuid4().hex[:4]}"
    admin = psycopg.connect(admin_url, autocommit=True, connect_timeout=5)
    admin.execute(f'CREATE DATABASE "{name}"')
    url = admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + \
        f"/{name}"
    trace = tempfile.TemporaryFile()  # noqa: SIM115 - closed in the finally below

    async def measure() -> float:
        settings = Settings(database_url=url, broker_url=REDIS, notify_enabled=False)
        pool = StartPool(settings, 1)  # one connection: every start is on the trace
        try:
            for i in range(20):  # warm the connection, the catalog and the statements
                await pool.start(StartRequest(user_id=f"bench-{i % accounts}",
                                              feature_endpoint_id=FEATURE))
            for conn in pool._idle:  # noqa: SLF001 - the bench traces the pool's wire
                conn.pgconn.trace(trace.fileno())
                conn.pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS)
            t0 = time.perf_counter()
            for i in range(starts):
                result = await pool.start(StartRequest(user_id=f"bench-{i % accounts}",
                                                       feature_endpoint_id=FEATURE))
                assert result.status == "accessible", result
            return time.perf_counter() - t0
        finally:
            await pool.close()

    try:
        prepare(url, accounts)
        elapsed = asyncio.run(measure())
        trace.seek(0)
        turns, previous = 0, ""
        for line in trace.read().decode(errors="replace").splitlines():
            side = line[:1]
            if side == "B" and previous == "F":
                turns += 1
            if side in ("F", "B"):
                previous = side
        return {"starts": starts, "roundtrips_per_start": round(turns / starts, 2),
                "sequential_ms_per_start": round(1000 * elapsed / starts, 3)}
    finally:
        trace.close()
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def main() -> None:
    if "--loadgen" in sys.argv:
        loadgen_main([a for a in sys.argv[1:] if a != "--loadgen"])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=10.0, help="measured duration")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--accounts", type=int, default=5000)
    p.add_argument("--max-requests", type=int, default=200_000)
    p.add_argument("--workers", type=int, default=WORKERS, help="uvicorn worker processes")
    p.add_argument("--pg", default=PG_ADMIN, help="PostgreSQL admin URL")
    p.add_argument("--redis", default=REDIS)
    p.add_argument("--keep", action="store_true", help="keep the bench database")
    p.add_argument("--json", type=Path, help="also write the result here")
    p.add_argument("--roundtrips", type=int, metavar="N",
                   help="only count database round trips over N sequential starts")
    a = p.parse_args()
    if a.roundtrips:
        print(json.dumps(count_roundtrips(admin_url=a.pg, starts=a.roundtrips)))
        return
    result = run(admin_url=a.pg, broker_url=a.redis, accounts=a.accounts, seconds=a.seconds,
                 warmup=a.warmup, connections=a.connections, max_requests=a.max_requests,
                 workers=a.workers, keep=a.keep)
    print(f"token-process start over HTTP ({result['workers']} uvicorn workers, "
          f"{result['connections']} connections, {result['cpus']} CPUs)")
    print(f"  requests  {result['requests']:>10} in {result['seconds']} s")
    print(f"  req/s     {result['rps']:>10}   (target >= {TARGET_RPS})")
    print(f"  p50 / p90 {result['p50_ms']:>7} / {result['p90_ms']} ms")
    print(f"  p99       {result['p99_ms']:>10} ms (target <= {TARGET_P99_MS})")
    print(f"  max       {result['max_ms']:>10} ms")
    print(f"  errors    {result['errors'] or 'none'}")
    if "healthz_rps" in result:
        print(f"  (HTTP stack alone, GET /healthz: {result['healthz_rps']} req/s, "
              f"p99 {result['healthz_p99_ms']} ms)")
    print(json.dumps(result))
    if a.json:
        a.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
