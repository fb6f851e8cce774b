"""Operator commands against the real services: Flower behind basic auth, ``status``,
and the readiness checks the API routes to ``/readyz``."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.support import ROOT, Worker, run_cli, session_scope
from tokenledger import Settings
from tokenledger.cli.services import parse_basic_auth
from tokenledger.ops.health import check_broker, check_database, readiness
from tokenledger.queue.deadletters import record as record_dead_letter
from tokenledger.timeutil import utcnow

pytestmark = pytest.mark.services

AUTH = ("ops", "flower-test-pw")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(settings: Settings, *args: str, **env: str):
    return run_cli(settings, *args, **env)


@pytest.fixture
def flower(settings: Settings, worker: Worker, tmp_path) -> Iterator[str]:
    port = free_port()
    log = tmp_path / "flower.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from tokenledger.cli import main; main()", "flower",
             "--port", str(port), "--address", "127.0.0.1"],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, **Worker.env_for(settings),
                 "TOKENLEDGER_FLOWER_BASIC_AUTH": ":".join(AUTH)})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                httpx.get(base + "/healthcheck", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)
        yield base
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
        assert ":".join(AUTH) not in " ".join(proc.args)  # never on the command line


def test_flower_requires_credentials_and_lists_the_workers_with_them(flower, settings):
    assert httpx.get(flower + "/", timeout=10).status_code == 401
    assert httpx.get(flower + "/healthcheck", timeout=10).text == "OK"  # compose probes it
    assert httpx.get(flower + "/api/workers", timeout=10).status_code == 401
    assert httpx.get(flower + "/", auth=("ops", "wrong"), timeout=10).status_code == 401
    assert httpx.get(flower + "/", auth=AUTH, timeout=10).status_code == 200
    deadline = time.monotonic() + 30
    while True:
        reply = httpx.get(flower + "/api/workers", params={"refresh": 1}, auth=AUTH,
                          timeout=30)
        assert reply.status_code == 200
        ours = [name for name, info in reply.json().items()
                if any(q.get("name") == settings.tasks_queue
                       for q in (info or {}).get("active_queues") or [])]
        if ours or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert ours, f"our worker is not in {sorted(reply.json())}"
    page = httpx.get(flower + "/workers", auth=AUTH, timeout=10)
    assert page.status_code == 200


def test_flower_refuses_to_start_without_credentials(settings):
    done = cli(settings, "flower", "--port", str(free_port()),
               TOKENLEDGER_FLOWER_BASIC_AUTH="")
    assert done.exit_code == 2
    assert "TOKENLEDGER_FLOWER_BASIC_AUTH" in done.stderr and "--unsafe-no-auth" in done.stderr
    bad = cli(settings, "flower", TOKENLEDGER_FLOWER_BASIC_AUTH="admin-without-password")
    assert bad.exit_code == 2 and "user:password" in bad.stderr


def test_basic_auth_accepts_several_users():
    assert parse_basic_auth("a:1, b:p:w") == ["a:1", "b:p:w"]
    for bad in ("", "a", "a:", ":p", "a:1,b"):
        with pytest.raises(ValueError):
            parse_basic_auth(bad)


def test_status_shows_queues_workers_dlq_and_renewal_runs(settings, worker, db):
    with session_scope(db) as session:
        record_dead_letter(session, {"junk": 1}, "test", utcnow())
    secret_url = settings.ledger_url().replace("postgres@", "postgres:st4tus-pw@", 1)
    done = cli(settings, "status", "--json", "--timeout", "3",
               TOKENLEDGER_DATABASE_URL=secret_url)
    assert done.exit_code == 0, done.stderr
    assert "st4tus-pw" not in done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["ready"] is True
    assert report["database"].startswith("postgresql+psycopg://postgres:***@")
    assert settings.queue in report["queues"] and isinstance(report["queues"][settings.queue],
                                                             int)
    assert any(settings.queue in w["queues"] and w["ok"] for w in report["workers"].values())
    assert report["dlq"] == 1
    assert report["renewal_runs"] is None or isinstance(report["renewal_runs"], list)

    table = cli(settings, "status", "--timeout", "3")
    assert table.exit_code == 0, table.stderr
    assert settings.queue in table.stdout and "dead letters: 1" in table.stdout


def test_status_exits_1_when_the_broker_is_unreachable(settings, db):
    done = cli(settings, "status", "--json", TOKENLEDGER_BROKER_URL="redis://127.0.0.1:1/0")
    assert done.exit_code == 1
    report = json.loads(done.stdout)
    assert report["ready"] is False
    assert [c["ok"] for c in report["checks"]] == [True, False]


def test_readiness_checks_name_what_is_down_without_passwords(settings, db):
    assert check_database(settings).ok and check_broker(settings).ok
    ready, checks = readiness(settings)
    assert ready and [c.name for c in checks] == ["database", "broker"]
    down = settings.model_copy(update={
        "database_url": "postgresql+psycopg://u:hunter2@127.0.0.1:1/x",
        "broker_url": "redis://:hunter2@127.0.0.1:1/0"})
    ready, checks = readiness(down)
    assert not ready and not any(c.ok for c in checks)
    assert all("hunter2" not in c.detail and ":***@" in c.detail for c in checks)
