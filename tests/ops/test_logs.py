"""Structured logs: every worker log line is one JSON object, and secrets never appear."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import ROOT, Worker
from tokenledger import LedgerClient
from tokenledger.ops.logs import configure_logging, log_context, mask_url, scrub
from tokenledger.queue.names import APPLY_EVENTS

PASSWORD = "Sup3r-s3cret-pw"


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """configure_logging replaces the root handlers; give pytest its own back."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)


def test_a_line_is_one_json_object_with_context_and_extra_fields():
    buf = io.StringIO()
    configure_logging("DEBUG", stream=buf)
    log = logging.getLogger("tokenledger.test")
    with log_context(task_id="t-1"):
        log.info("applied", extra={"event_key": "k1", "user_id": "u1", "outcome": "applied",
                                   "duration_ms": 1.5})
    log.info("outside")
    first, second = (json.loads(line) for line in buf.getvalue().splitlines())
    assert {k: first[k] for k in ("level", "logger", "message", "task_id", "event_key",
                                  "user_id", "outcome", "duration_ms")} == {
        "level": "info", "logger": "tokenledger.test", "message": "applied", "task_id": "t-1",
        "event_key": "k1", "user_id": "u1", "outcome": "applied", "duration_ms": 1.5}
    assert first["ts"].endswith("Z")
    assert "task_id" not in second


def test_secrets_are_masked_in_messages_fields_and_tracebacks():
    buf = io.StringIO()
    configure_logging("INFO", stream=buf)
    log = logging.getLogger("tokenledger.test")
    log.warning("cannot reach postgresql+psycopg://app:%s@db:5432/ledger", PASSWORD,
                extra={"headers": {"x-server-api-key": "tl_live_abc", "accept": "json"},
                       "broker": f"redis://:{PASSWORD}@redis:6379/0"})
    try:
        raise RuntimeError(f"login failed: password={PASSWORD}")
    except RuntimeError:
        log.exception("boom; x-server-api-key: tl_live_abc")
    text = buf.getvalue()
    assert PASSWORD not in text and "tl_live_abc" not in text
    warning, error = (json.loads(line) for line in text.splitlines())
    assert warning["message"] == "cannot reach postgresql+psycopg://app:***@db:5432/ledger"
    assert warning["headers"] == {"x-server-api-key": "***", "accept": "json"}
    assert warning["broker"] == "redis://:***@redis:6379/0"
    assert error["exc_type"] == "RuntimeError" and "password=***" in error["exc"]


def test_mask_url_keeps_everything_but_the_password():
    assert mask_url("postgresql+psycopg://u:p@h:5432/d?sslmode=require") == \
        "postgresql+psycopg://u:***@h:5432/d?sslmode=require"
    assert mask_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert scrub("Authorization: Basic dXNlcjpwdw==") == "Authorization: ***"


@pytest.mark.services
def test_worker_log_lines_parse_as_json_and_carry_event_context(settings, db, tmp_path: Path):
    # The password is accepted and ignored by the test server's trust authentication.
    url = settings.database_url.replace("postgres@", f"postgres:{PASSWORD}@", 1)
    own = settings.model_copy(update={"queue": f"{settings.queue}-logs", "database_url": url})
    env = {**os.environ, **Worker.env_for(own), "TOKENLEDGER_LOG_JSON": "true"}
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tokenledger.queue.app", "worker", "-Q",
             own.queue,
             "-c", "1", "-l", "info", "--without-gossip", "--without-mingle",
             "--without-heartbeat", "-n", f"tllogs-{uuid.uuid4().hex[:8]}@%h"],
            cwd=ROOT, env=env, stdout=stdout, stderr=stderr, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while b" ready." not in err.read_bytes():
            assert proc.poll() is None, err.read_text()[-3000:]
            assert time.monotonic() < deadline, err.read_text()[-3000:]
            time.sleep(0.1)
        user = f"log-{uuid.uuid4().hex[:8]}"
        with LedgerClient(own) as client:
            client.open_account(user)
            key = client.charge(user, amount=2)
            assert client.result(key, timeout=30).status == "applied"
            client.producer.send(APPLY_EVENTS, [["not an event"]], queue=own.queue)
            deadline = time.monotonic() + 30
            while (b'"outcomes":{"dead_lettered":1}' not in err.read_bytes()
                   and time.monotonic() < deadline):
                time.sleep(0.1)
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)

    text = err.read_text()
    assert PASSWORD not in text and PASSWORD not in out.read_text()
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]  # every line
    assert all({"ts", "level", "logger", "message"} <= set(line) for line in lines)
    starting = next(line for line in lines if line["message"] == "worker starting")
    assert starting["database"] == mask_url(url) and ":***@" in starting["database"]
    applied = next(line for line in lines if line.get("event_key") == key)
    assert applied["user_id"] == user and applied["outcome"] == "applied"
    assert applied["duration_ms"] > 0 and applied["latency_ms"] >= 0
    assert applied["task_id"] and applied["logger"] == "tokenledger.worker"
    assert any(line.get("outcomes") == {"dead_lettered": 1} for line in lines)
    assert any(line["message"].endswith(" ready.") for line in lines)
