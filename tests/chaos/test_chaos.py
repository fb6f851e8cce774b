"""Chaos: real faults against private servers, checked against a model of the ledger.

Every scenario publishes single-event charges from 8 threads while something breaks,
then asserts that every accepted event is final exactly once, balances equal the model,
``verify`` is clean, and recovery stayed within its bound. Figures are printed at the end
of the run ("chaos figures"). CI runs the sized-down variants (``-m "chaos and not
long"``); ``-m long`` runs the 10,000-event ones.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from sqlalchemy import text

from tests.chaos.conftest import Stream, chaos_events, open_users, settle
from tests.support import ROOT, Worker, assert_verified, session_scope
from tokenledger import LedgerClient
from tokenledger.queue import message as wire
from tokenledger.queue.names import APPLY_EVENTS

pytestmark = [pytest.mark.chaos, pytest.mark.services]

# An accepted event is final within this long of the last fault: kombu gives back a dead
# worker's messages after the visibility timeout (10 s here) plus one restore scan (2 s);
# the reconciler queues again one taken and never recorded after 30 s + one pass (15 s).
RECOVERY_BOUND = 10 + 2 + 30 + 15 + 30  # + 30 s of slack for this 2-core machine


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@pytest.mark.parametrize("events", [
    pytest.param(chaos_events(3_000), id="ci"),
    pytest.param(10_000, id="long", marks=pytest.mark.long),
])
def test_kill_9_of_whole_workers_and_pool_children_loses_and_doubles_nothing(
        chaos, tmp_path: Path, events: int) -> None:
    users = open_users(chaos, 40)
    workers = [Worker(chaos, tmp_path).start(), Worker(chaos, tmp_path).start()]
    # Paced so the stream outlasts several kills (a restarted worker is ready in ~3 s).
    stream = Stream(chaos, users, events, rate=events / 18).start()
    whole = children = 0
    try:
        turn = 0
        while not stream.done.wait(1.5):
            turn += 1
            if turn % 2:  # a whole worker, main process and pool, at once
                victim = turn % len(workers)
                workers[victim].kill(9)
                whole += 1
                workers[victim] = Worker(chaos, tmp_path).start()
            else:  # one pool process of the other worker, mid-group
                kids = _children(workers[(turn + 1) % len(workers)].proc.pid)
                if kids:
                    os.kill(kids[0], signal.SIGKILL)
                    children += 1
        stream.wait()
        settle(chaos, stream, RECOVERY_BOUND, {
            "scenario": "kill -9 loop", "whole_worker_kills": whole,
            "pool_child_kills": children})
    finally:
        for w in workers:
            w.stop()
    assert whole >= 2 and children >= 1


def test_redis_stopped_and_restarted_mid_stream_loses_nothing(chaos, servers,
                                                             tmp_path: Path) -> None:
    _, rd = servers
    users = open_users(chaos, 20)
    worker = Worker(chaos, tmp_path).start()
    stream = Stream(chaos, users, chaos_events(2_000), rate=250).start()
    try:
        time.sleep(2.5)
        rd.stop()  # SIGTERM: Redis writes its append-only file and exits
        time.sleep(4)
        rd.start()
        stream.wait()
        settle(chaos, stream, RECOVERY_BOUND, {"scenario": "redis restart",
                                               "redis_down_seconds": 4})
        assert stream.publish_failures > 0, "no publish ever met the outage"
        assert worker.proc.poll() is None, "the worker did not survive the restart"
    finally:
        worker.stop()


def test_postgres_immediate_restart_and_a_10_second_outage_lose_nothing(
        chaos, servers, tmp_path: Path) -> None:
    pg, _ = servers
    users = open_users(chaos, 20)
    worker = Worker(chaos, tmp_path).start()
    stream = Stream(chaos, users, chaos_events(3_000), rate=200).start()
    try:
        time.sleep(2)
        pg.stop("immediate")  # a crash: no checkpoint, recovery from the WAL
        pg.start()
        time.sleep(2)
        pg.stop("immediate")
        time.sleep(10)
        pg.start()
        stream.wait()
        settle(chaos, stream, RECOVERY_BOUND, {"scenario": "postgres crash + 10 s outage"})
    finally:
        worker.stop()
    log = worker.log.read_text()
    assert "database unavailable applying" in log, "the outage never met a transaction"


def test_poison_among_good_events_is_dead_lettered_and_good_ones_flow(
        chaos, tmp_path: Path) -> None:
    users = open_users(chaos, 20)
    worker = Worker(chaos, tmp_path).start()
    stream = Stream(chaos, users, chaos_events(2_000), rate=400).start()
    raw = redis.Redis.from_url(chaos.broker())
    poison = 0
    try:
        with LedgerClient(chaos) as client:
            producer = client.producer
            for i in range(20):
                producer.send(APPLY_EVENTS, [], {})  # bad signature
                producer.send(APPLY_EVENTS, [[{"type": "charge"}]], {"bogus": 1})
                producer.publish_events({"type": "charge", "key": f"nul-{i}\x00",
                                         "user_id": users[0], "amount": 1})
                producer.publish_events({"type": "charge", "key": f"huge-{i}",
                                         "user_id": users[0], "amount": 2**70})
                producer.publish_events({"type": "charge", "key": f"ghost-{i}",
                                         "user_id": f"nobody-{i}", "amount": 1})
                raw.lpush(chaos.queue, f"not json {i} {{")
                _, envelope = wire.redis_envelope(APPLY_EVENTS, chaos.queue, [[]])
                message = json.loads(envelope)
                message["content-type"] = "application/x-python-serialize"
                message["body"] = base64.b64encode(pickle.dumps(["x"])).decode()
                raw.lpush(chaos.queue, json.dumps(message))
                poison += 7
                time.sleep(0.1)
        stream.wait()
        settle(chaos, stream, RECOVERY_BOUND, {"scenario": "poison mix",
                                               "poison_messages": poison})
        assert worker.proc.poll() is None, "poison stopped the worker"
    finally:
        worker.stop()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with session_scope(chaos) as s:
            letters = s.scalar(text("SELECT count(*) FROM dead_letters"))
        if letters >= poison:
            break
        time.sleep(0.2)
    assert letters == poison, (letters, poison)


def _beat(settings, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, **Worker.env_for(settings)}
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "celery", "-A", "tokenledger.queue.app",
                                 "beat", "-l", "info", "-s", str(log.with_suffix(".db"))],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _wait_log(log: Path, needle: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while needle not in log.read_text(errors="replace"):
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)


def test_two_beats_with_the_holder_killed_grant_each_due_account_once(
        chaos, tmp_path: Path) -> None:
    accounts = 3_000
    with session_scope(chaos) as s:  # due for their monthly renewal since yesterday
        s.execute(text(
            "INSERT INTO accounts (user_id, plan_code, timezone, created_at, last_renewal_at)"
            " SELECT 'b' || g, 'Professional', 'UTC', now() - interval '31 days',"
            " now() - interval '31 days' FROM generate_series(1, :n) AS g"), {"n": accounts})
        s.execute(text("INSERT INTO wallets (account_id, wallet_type, balance, is_active,"
                       " created_at) SELECT id, 'STANDARD', 0, true, now() FROM accounts"))
    worker = Worker(chaos, tmp_path).start()
    logs = [tmp_path / "beat1.log", tmp_path / "beat2.log"]
    first = _beat(chaos, logs[0])
    second = None
    started = time.monotonic()
    try:
        _wait_log(logs[0], "acquired the beat lock")
        second = _beat(chaos, logs[1])
        _wait_log(logs[1], "another beat holds the beat lock")
        _wait_log(logs[0], "catching up monthly-renewal")
        os.killpg(first.pid, signal.SIGKILL)  # the holder dies right after catching up
        first.wait(timeout=10)
        _wait_log(logs[1], "acquired the beat lock", timeout=60)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            with session_scope(chaos) as s:
                granted = s.scalar(text("SELECT count(DISTINCT wallet_id) FROM ledger_entries"
                                        " WHERE type = 'RENEWAL'"))
            if granted == accounts:
                break
            time.sleep(0.5)
        time.sleep(2)  # let a second run, if one were to grant again, show itself
        with session_scope(chaos) as s:
            entries = s.scalar(text("SELECT count(*) FROM ledger_entries"
                                    " WHERE type = 'RENEWAL'"))
            runs = s.scalar(text("SELECT count(*) FROM renewal_runs WHERE kind = 'monthly'"))
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=20)
        worker.stop()
    from tests.chaos.conftest import FIGURES

    FIGURES.append({"scenario": "two beats, holder killed", "accounts": accounts,
                    "granted": granted, "renewal_entries": entries, "runs": runs,
                    "seconds": round(time.monotonic() - started, 1)})
    assert granted == accounts and entries == accounts, (granted, entries, runs)
    assert_verified(chaos)

