"""The command line, run in this process (typer's CliRunner) with the test's settings;
``test_entry_point`` runs the installed ``tokenledger`` command itself."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
from sqlalchemy import text

from tests.support import Worker, run_cli, session_scope

pytestmark = pytest.mark.services


def cli(settings, *args: str, check: bool = True):
    done = run_cli(settings, *args)
    if check:
        assert done.exit_code == 0, done.stdout + done.stderr
    return done


def test_accounts_publish_balance_history_and_verify(worker, settings, db):
    assert "ana: opened on plan Gift, balance 100" in cli(settings, "accounts", "open", "ana",
                                                          "--plan", "Gift").stdout
    assert "ana: already open on plan Gift" in cli(settings, "accounts", "open", "ana").stdout
    charged = cli(settings, "publish", "charge", "ana", "--feature", "image_generation",
                  "--key", "img-1")
    assert "applied" in charged.stdout and "img-1" in charged.stdout
    cli(settings, "publish", "credit", "ana", "25", "--reason", "purchase")
    refunded = cli(settings, "publish", "refund", "ana", "img-1", "--reason", "timeout")
    assert "'refunded': 10" in refunded.stdout
    balance = json.loads(cli(settings, "balance", "ana", "--json").stdout)
    assert balance["balance"] == 125
    assert {w["wallet_type"] for w in balance["wallets"]} == {"STANDARD", "PREMIUM"}
    history = json.loads(cli(settings, "history", "ana", "--json").stdout)
    assert [h["type"] for h in history] == ["REFUND", "CREDIT", "CHARGE", "OPEN"]
    report = json.loads(cli(settings, "verify", "--json").stdout)
    assert report["ok"] and report["wallets"] == 2


def test_verify_exits_1_when_a_balance_does_not_match_its_entries(settings, db):
    cli(settings, "accounts", "open", "eve")
    with session_scope(db) as s:  # tamper with a balance behind the ledger's back
        s.execute(text("UPDATE wallets SET balance = balance + 7"))
    done = cli(settings, "verify", check=False)
    assert done.exit_code == 1, done.stdout + done.stderr
    assert "MISMATCH" in done.stdout and "1 balance mismatches" in done.stdout
    done = cli(settings, "verify", "--json", check=False)
    assert done.exit_code == 1 and json.loads(done.stdout)["balance_mismatches"]


@pytest.mark.parametrize(("args", "message"), [
    (("publish", "charge", "x", "--amount", "-3"), "amount: Input should be greater than 0"),
    (("publish", "charge", "x"), "a charge needs a feature or an amount"),
    (("publish", "credit", "x", "5", "--wallet-type", "bad type"), "wallet_type:"),
    (("balance", "nobody"), "account not found: 'nobody'"),
    (("accounts", "open", "y", "--timezone", "Mars/Olympus"), "unknown IANA timezone"),
    (("accounts", "open", "y", "--plan", "Platinum"), "unknown plan 'Platinum'"),
    (("dlq", "retry"), "name dead-letter ids, or pass --all"),
])
def test_bad_input_is_one_clear_line_without_a_traceback(settings, db, args, message):
    done = cli(settings, *args, check=False)
    assert done.exit_code == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert len(done.stderr.strip().splitlines()) == 1


def test_dlq_list_retry_and_drop(worker, settings, db):
    assert cli(settings, "publish", "charge", "late", "--amount", "2", "--key", "late-1",
               check=False).exit_code == 14  # dead-lettered
    listed = json.loads(cli(settings, "dlq", "list", "--json").stdout)
    assert [(d["key"], d["reason"]) for d in listed] == [("late-1", "account not found")]
    cli(settings, "accounts", "open", "late")
    assert "re-published 1" in cli(settings, "dlq", "retry", "--all").stdout
    from tokenledger import LedgerClient
    with LedgerClient(settings) as client:
        assert client.result("late-1", timeout=30).status == "applied"
    cli(settings, "publish", "charge", "ghost", "--amount", "1", "--key", "ghost-1",
        check=False)
    (ghost,) = json.loads(cli(settings, "dlq", "list", "--json").stdout)
    assert "dropped 1" in cli(settings, "dlq", "drop", str(ghost["id"])).stdout
    assert json.loads(cli(settings, "dlq", "list", "--json").stdout) == []


def test_catalog_show_lists_plans_features_and_prices(settings, db):
    shown = json.loads(cli(settings, "catalog", "show", "--json").stdout)
    assert shown["default_plan"] == "Free"
    assert shown["plans"]["Business"]["allocation"] == 10000
    assert shown["features"]["image_generation"]["cost"] == 10
    assert shown["models"]["gemini-pro"]["output_weight"] == "4"


def test_entry_point_runs_as_installed(settings, db):
    """The ``tokenledger`` script on PATH: a command, its output, its exit code, and an
    error as one line without a traceback."""
    exe = shutil.which("tokenledger")
    assert exe, "the tokenledger entry point is not installed"
    env = {**os.environ, **Worker.env_for(settings)}
    done = subprocess.run([exe, "verify", "--json"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and json.loads(done.stdout)["ok"], done.stderr
    bad = subprocess.run([exe, "balance", "nobody"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip() == "error: account not found: 'nobody'"
