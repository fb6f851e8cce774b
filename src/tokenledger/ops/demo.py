"""``tokenledger demo``: a real worker, a realistic stream, and what happened to it."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy import func, select, text

from tokenledger.config import Settings
from tokenledger.db.migrate import migrate
from tokenledger.db.uow import unit_of_work
from tokenledger.ledger.models import EventConflict, EventOutcome
from tokenledger.ledger.verify import verify
from tokenledger.queue.models import DeadLetter
from tokenledger.sdk.client import LedgerClient
from tokenledger.timeutil import utcnow

PLANS = [("Free", 0.70), ("Gift", 0.15), ("Professional", 0.10), ("Business", 0.05)]
FREE_FEATURES = ["project_creation", "chatgpt_message", "chat", "preview"]
PAID_FEATURES = ["project_creation", "image_generation", "sora_image", "chatgpt_message"]


def start_worker(settings: Settings, log_path: Path, concurrency: int = 2,
                 beat: bool = False) -> subprocess.Popen:
    """A real ``celery -A workers worker`` on the configured broker, ready to consume
    (with ``beat``: the scheduler embedded, as `celery worker -B`)."""
    env = {**os.environ, "TOKENLEDGER_DATABASE_URL": settings.ledger_url(),
           "TOKENLEDGER_BROKER_URL": settings.broker(), "TOKENLEDGER_QUEUE": settings.queue}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tokenledger.queue.app", "worker",
             "-Q", settings.queue,
             "-c", str(concurrency), "-l", "info", "--without-gossip", "--without-mingle",
             "-n", f"demo-{uuid.uuid4().hex[:6]}@%h", *(["-B"] if beat else [])],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while b" ready." not in log_path.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the worker did not start; see {log_path}")
        time.sleep(0.1)
    return proc


def stop_worker(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class Stream:
    """A realistic, reproducible mix of events for the demo's accounts."""

    def __init__(self, run: str, users: dict[str, str], seed: int) -> None:
        self.run = run
        self.users = users
        self.rng = random.Random(seed)
        self.n = 0
        self.charges: list[dict[str, Any]] = []
        self.published: list[dict[str, Any]] = []
        self.counts: Counter[str] = Counter()

    def key(self) -> str:
        self.n += 1
        return f"demo-{self.run}-{self.n:06d}"

    def next(self) -> dict[str, Any]:
        rng = self.rng
        user = rng.choice(list(self.users))
        paid = self.users[user] != "Free"
        roll = rng.random()
        if roll < 0.08 and self.published:
            self.counts["duplicate deliveries"] += 1
            return dict(rng.choice(self.published))
        if roll < 0.16 and self.charges:
            original = rng.choice(self.charges)
            self.counts["refunds"] += 1
            event = {"type": "refund", "key": self.key(), "user_id": original["user_id"],
                     "original_key": original["key"],
                     "reason": rng.choice(["operation_failed", "timeout", "goodwill"])}
        elif roll < 0.26:
            self.counts["credits"] += 1
            event = {"type": "credit", "key": self.key(), "user_id": user,
                     "amount": rng.choice([10, 20, 50, 100]), "reason": "purchase",
                     "wallet_type": rng.choice(["PREMIUM", "PREMIUM", "PROMO"])}
            if event["wallet_type"] == "PROMO":
                event["expires_at"] = (utcnow() + timedelta(days=rng.randint(1, 30))).isoformat()
        elif roll < 0.32:
            self.counts["charges by amount"] += 1
            event = {"type": "charge", "key": self.key(), "user_id": user,
                     "amount": rng.randint(1, 40)}
        else:
            self.counts["charges by feature"] += 1
            event = {"type": "charge", "key": self.key(), "user_id": user,
                     "feature": rng.choice(PAID_FEATURES if paid else FREE_FEATURES),
                     "metadata": {"request": uuid.uuid4().hex[:8]}}
        if event["type"] == "charge":
            self.charges.append(event)
        self.published.append(event)
        return event


@dataclass
class Flow:
    """An LLM call drawn from the seed: a start before the stream is published (so whether
    it is refused depends on the seed alone, not on how far the worker has got), and its
    end event at its place in the stream."""

    user: str
    max_output_tokens: int
    input_tokens: int
    output_tokens: int
    end: dict[str, Any] | None = None

    @classmethod
    def draw(cls, stream: Stream, rng: random.Random) -> Flow:
        return cls(rng.choice(list(stream.users)), rng.choice([200, 500, 1000]),
                   rng.randint(20, 800), rng.randint(0, 1000))

    def start(self, client: LedgerClient, stream: Stream) -> None:
        """Place the hold; on success the end event joins the stream."""
        started = client.token_process_start(self.user, "text_generation",
                                             max_output_tokens=self.max_output_tokens)
        if started.status != "accessible":
            stream.counts["token-process starts refused"] += 1
            return
        stream.counts["token-process flows (start + end)"] += 1
        self.end = {"type": "token_process_end", "key": stream.key(), "user_id": self.user,
                    "feature_endpoint_id": "text_generation",
                    "input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
                    "model": "gemini-pro", "hold_id": started.hold_id}
        stream.published.append(self.end)


def run_demo(settings: Settings, *, users: int = 200, events: int = 5000, seed: int = 7,
             console: Console | None = None) -> bool:
    """Run the whole demo; returns whether ``verify`` came out clean."""
    console = console or Console()
    run = uuid.uuid4().hex[:6]
    where = ("the embedded PostgreSQL + Redis"
             if settings.embedded_database and settings.embedded_broker
             else "the configured database + broker")
    console.rule(f"[bold]tokenledger demo[/bold] — run {run} on {where}")
    migrate(settings.ledger_url(), settings.catalog)
    console.print("[green]✓[/green] database migrated, catalog loaded")
    log_path = settings.home / "logs" / "demo-worker.log"
    # One worker process applies the messages in the order they were published, so the
    # same seed gives the same outcomes too (which charge is declined depends on order).
    worker = start_worker(settings, log_path, concurrency=1, beat=True)
    console.print(f"[green]✓[/green] worker and beat started (pid {worker.pid}, "
                  f"log {log_path})")
    try:
        return _run(settings, console, run, users, events, seed)
    finally:
        stop_worker(worker)


def _run(settings: Settings, console: Console, run: str, n_users: int, n_events: int,
         seed: int) -> bool:
    rng = random.Random(seed)
    users: dict[str, str] = {}
    with LedgerClient(settings) as client:
        for i in range(n_users):
            plan = rng.choices([p for p, _ in PLANS], [w for _, w in PLANS])[0]
            user = f"demo-{run}-user{i:04d}"
            client.open_account(user, plan=plan)
            users[user] = plan
        console.print(f"[green]✓[/green] opened {n_users} accounts "
                      f"({', '.join(f'{c} {p}' for p, c in Counter(users.values()).items())})")

        stream = Stream(run, users, seed)
        # Everything is drawn from the seed first and the starts run before anything is
        # published, so the same seed gives the same stream and the same counts.
        drawn: list[dict[str, Any] | Flow | None] = []  # None: a message ends here
        size = 0
        for _ in range(n_events):
            if rng.random() < 0.05:
                drawn.append(Flow.draw(stream, rng))
                size += 1
                continue
            drawn.append(stream.next())
            size += 1
            if size >= rng.randint(1, 250):
                drawn.append(None)
                size = 0
        for flow in drawn:
            if isinstance(flow, Flow):
                flow.start(client, stream)
        started = time.monotonic()
        batch: list[dict[str, Any]] = []
        for item in [*drawn, None]:
            if isinstance(item, Flow):
                if item.end is not None:
                    batch.append(item.end)
            elif item is not None:
                batch.append(item)
            elif batch:
                client.publish_many(batch)
                batch = []
        # The awkward cases, on purpose.
        victim = stream.charges[0]
        client.publish({**victim, "metadata": {"tampered": True}})  # same key, other payload
        stream.counts["conflicting duplicates"] += 1
        client.publish({"type": "charge", "key": stream.key(), "user_id": "nobody-here",
                        "amount": 1})
        stream.counts["unknown account"] += 1
        # A malformed event: the worker dead-letters it.
        client.producer.publish_events({"type": "charge", "user_id": 42, "amount": "lots"})
        stream.counts["malformed messages"] += 1

        unique = stream.n
        prefix = f"demo-{run}-%"
        with Progress(TextColumn("applying"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console) as progress:
            task = progress.add_task("events", total=unique)
            deadline = time.monotonic() + 600
            done = 0
            while done < unique and time.monotonic() < deadline:
                done = _settled(settings, prefix)
                progress.update(task, completed=done)
                time.sleep(0.2)
        elapsed = time.monotonic() - started
        time.sleep(0.5)  # let the last conflicts and dead letters land

    return _report(settings, console, run, prefix, stream, unique, elapsed, done)


def _settled(settings: Settings, prefix: str) -> int:
    with unit_of_work(settings) as uow:
        s = uow.session
        outcomes = s.scalar(select(func.count()).select_from(EventOutcome)
                            .where(EventOutcome.key.like(prefix))) or 0
        dead = s.scalar(select(func.count()).select_from(DeadLetter)
                        .where(DeadLetter.key.like(prefix))) or 0
    return outcomes + dead


def _report(settings: Settings, console: Console, run: str, prefix: str, stream: Stream,
            unique: int, elapsed: float, done: int) -> bool:
    with unit_of_work(settings) as uow:
        s = uow.session
        by_outcome = dict(s.execute(select(EventOutcome.outcome, func.count())
                                    .where(EventOutcome.key.like(prefix))
                                    .group_by(EventOutcome.outcome)).all())
        conflicts = s.scalar(select(func.count()).select_from(EventConflict)
                             .where(EventConflict.key.like(prefix))) or 0
        dead = s.scalar(select(func.count()).select_from(DeadLetter).where(
            DeadLetter.key.like(prefix) | DeadLetter.key.is_(None))) or 0
        plans = s.execute(text(
            "SELECT a.plan_code, count(DISTINCT a.id), sum(w.balance) FROM accounts a"
            " JOIN wallets w ON w.account_id = a.id WHERE a.user_id LIKE :p"
            " GROUP BY a.plan_code ORDER BY 3 DESC"), {"p": prefix}).all()
        report = verify(s)

    published = Table(title="published")
    published.add_column("kind")
    published.add_column("count", justify="right")
    for kind, count in sorted(stream.counts.items()):
        published.add_row(kind, str(count))
    outcome = Table(title="what happened")
    outcome.add_column("outcome")
    outcome.add_column("events", justify="right")
    for name in ("applied", "declined", "rejected"):
        outcome.add_row(name, str(by_outcome.get(name, 0)))
    outcome.add_row("duplicate (stored outcome returned)",
                    str(stream.counts["duplicate deliveries"]))
    outcome.add_row("conflict (recorded, not applied)", str(conflicts))
    outcome.add_row("dead-lettered", str(dead))
    outcome.add_row("end-to-end rate (publish → settled)",
                    f"{unique / elapsed:,.0f} events/s")
    balances = Table(title="balances by plan")
    for col in ("plan", "accounts", "total tokens"):
        balances.add_column(col, justify="right" if col != "plan" else "left")
    for plan, accounts, total in plans:
        balances.add_row(plan, str(accounts), f"{total:,}")
    console.print(published, outcome, balances)
    if done < unique:
        console.print(f"[red]only {done} of {unique} events settled in time[/red]")
    mark = "[green]verify OK[/green]" if report.ok else "[red]verify MISMATCH[/red]"
    console.print(f"{mark}: {report.wallets} wallets, {report.entries} ledger entries, every "
                  f"balance equals the sum of its entries, no key applied twice"
                  if report.ok else f"{mark}: {report.as_dict()}")
    console.print(f"Try: [bold]tokenledger balance demo-{run}-user0000[/bold], "
                  f"[bold]tokenledger history demo-{run}-user0000[/bold], "
                  "[bold]tokenledger dlq list[/bold]")
    return report.ok and done >= unique
