"""What reaches the caller (issue 15): each outcome its own exit code, every bad input and
every broken setting refused by name in one line, through the CLI and the SDK alike."""

from __future__ import annotations

import json

import psycopg
import pytest

from tests.conftest import PG_ADMIN, RUN_ID
from tests.support import run_cli
from tokenledger import LedgerClient, Settings
from tokenledger.config import get_settings
from tokenledger.errors import (
    AccountExists,
    BrokerUnavailable,
    ConfigurationError,
    Conflict,
    DatabaseUnavailable,
    NotMigrated,
    ValidationFailed,
)

pytestmark = pytest.mark.services


def cli(settings: Settings, *args: str, code: int = 0, **env: str):
    done = run_cli(settings, *args, **env)
    assert done.exit_code == code, (args, done.exit_code, done.stdout, done.stderr)
    assert "Traceback" not in done.stdout + done.stderr
    return done


def one_line(done) -> str:
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


# -- exit codes -----------------------------------------------------------------------------


def test_each_outcome_of_a_publish_has_its_own_exit_code(worker, settings, db):
    cli(settings, "accounts", "open", "ana")  # Free: 5 tokens
    charge = ("publish", "charge", "ana", "--wait", "30")
    cli(settings, *charge, "--amount", "2", "--key", "k1", code=0)
    again = cli(settings, *charge, "--amount", "2", "--key", "k1", "--json", code=10)
    assert json.loads(again.stdout)["replay"] is True
    clash = cli(settings, *charge, "--amount", "3", "--key", "k1", "--json", code=13)
    out = json.loads(clash.stdout)
    assert out["status"] == "conflict" and out["stored"]["status"] == "applied"
    assert "stored outcome: applied" in cli(settings, *charge, "--amount", "3", "--key", "k1",
                                             code=13).stdout
    declined = cli(settings, *charge, "--amount", "100", "--json", code=11)
    assert json.loads(declined.stdout)["status"] == "declined"
    rejected = cli(settings, *charge, "--feature", "teleport", code=12)
    assert "unknown feature 'teleport'" in rejected.stdout
    cli(settings, "publish", "charge", "ghost", "--amount", "1", "--wait", "30", code=14)


def test_waiting_with_no_worker_says_so_and_names_the_queue(settings, db):
    idle = f"{settings.queue}-idle"
    done = cli(settings, "publish", "credit", "ana", "5", "--wait", "0.5", code=15,
               TOKENLEDGER_QUEUE=idle)
    line = one_line(done)
    assert "no outcome" in line and f"no worker consumes queue {idle!r}" in line
    assert "tokenledger worker" in line


# -- no traceback ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def empty_db(settings: Settings):
    """A database with no tokenledger schema at all."""
    name = f"tokenledger_empty_{RUN_ID}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    yield f"{base}/{name}"
    from tokenledger.db.direct import close_all
    from tokenledger.db.engine import dispose_engines

    dispose_engines(close=True)
    close_all()
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.parametrize(("variable", "value", "says"), [
    ("TOKENLEDGER_DATABASE_URL", "", "TOKENLEDGER_DATABASE_URL: is empty"),
    ("TOKENLEDGER_DATABASE_URL", "not a url", "TOKENLEDGER_DATABASE_URL: 'not a url' is not"),
    ("TOKENLEDGER_DATABASE_URL", "mysql://u@h/db", "scheme 'mysql' is not supported"),
    ("TOKENLEDGER_BROKER_URL", "garbage://x", "scheme 'garbage' is not supported"),
])
def test_a_bad_setting_is_one_line_naming_it_in_the_cli_and_the_sdk(
        settings, db, monkeypatch, variable, value, says):
    done = cli(settings, "publish", "charge", "x", "--amount", "1", code=1,
               **{variable: value})
    assert says in one_line(done) and variable in one_line(done)
    monkeypatch.setenv(variable, value)
    get_settings.cache_clear()
    try:
        with pytest.raises(ConfigurationError, match=variable) as raised:
            LedgerClient()
    finally:
        get_settings.cache_clear()
    assert raised.value.__cause__ is not None


def test_settings_built_by_hand_raise_configuration_error_naming_the_variable():
    with pytest.raises(ConfigurationError, match="TOKENLEDGER_HOLD_TTL_SECONDS") as raised:
        Settings(hold_ttl_seconds=0)
    assert raised.value.__cause__ is not None
    with pytest.raises(ConfigurationError, match="TOKENLEDGER_DATABASE_URL"):
        Settings(database_url="")


def test_a_broker_that_is_down_is_one_line_and_broker_unavailable(settings, db):
    down = "redis://127.0.0.1:1/0"
    done = cli(settings, "publish", "charge", "x", "--amount", "1", code=1,
               TOKENLEDGER_BROKER_URL=down)
    assert "TOKENLEDGER_BROKER_URL" in one_line(done)
    with LedgerClient(settings.model_copy(update={"broker_url": down})) as client, \
            pytest.raises(BrokerUnavailable) as raised:
        client.charge("x", amount=1)
    assert raised.value.__cause__ is not None


def test_an_unmigrated_database_is_one_line_saying_migrate(settings, empty_db):
    for args in (("balance", "x"), ("status",), ("start", "x", "chat")):
        done = cli(settings, *args, code=1, TOKENLEDGER_DATABASE_URL=empty_db)
        line = one_line(done)
        assert "tokenledger migrate" in line and "TOKENLEDGER_DATABASE_URL" in line, args
    client = LedgerClient(settings.model_copy(update={"database_url": empty_db}))
    calls = (lambda: client.balance("x"), lambda: client.result("k"),
             lambda: client.open_account("x"),
             lambda: client.token_process_start("x", "chat"))
    for call in calls:
        with pytest.raises(NotMigrated) as raised:
            call()
        assert raised.value.__cause__ is not None


def test_status_on_an_unreachable_database_is_one_line(settings, db):
    done = cli(settings, "status", code=1,
               TOKENLEDGER_DATABASE_URL="postgresql://postgres@127.0.0.1:1/nowhere")
    assert "database unavailable" in one_line(done)
    with pytest.raises(DatabaseUnavailable):
        LedgerClient(settings.model_copy(update={
            "database_url": "postgresql+psycopg://postgres@127.0.0.1:1/nowhere"})).balance("x")


def test_with_only_the_database_set_publish_says_which_broker_it_uses(settings, db, tmp_path):
    done = run_cli(settings, "publish", "charge", "x", "--amount", "1", "--wait", "0",
                   TOKENLEDGER_BROKER_URL="", TOKENLEDGER_HOME=str(tmp_path))
    # An empty TOKENLEDGER_BROKER_URL is refused by name; unset, the embedded Redis in
    # TOKENLEDGER_HOME (never the working directory) carries it, and publish says so.
    assert done.exit_code == 1 and "TOKENLEDGER_BROKER_URL: is empty" in done.stderr
    unset = settings.model_copy(update={"broker_url": None, "home": tmp_path})
    from tokenledger.cli.publish import _via

    with LedgerClient(unset) as client:
        assert _via(client) == f" via the embedded Redis in {tmp_path}"


# -- bad input refused by name --------------------------------------------------------------


def test_bad_input_is_refused_by_name_in_the_cli(worker, settings, db):
    cli(settings, "accounts", "open", "bo", "--plan", "Professional")
    wait = ("--wait", "30")
    cases = [
        (("start", "bo", "text_generation", "--model", "nope"), 2, "unknown model 'nope'"),
        (("end", "bo", "text_generation", "--input-tokens", "1", "--output-tokens", "1",
          "--model", "nope", *wait), 12, "unknown model 'nope'"),
        (("publish", "credit", "bo", "5", "--wallet-type", "BOGUS", *wait), 12,
         "unknown wallet type 'BOGUS'"),
        (("publish", "charge", "bo", "--amount", "1", "--preferred-wallet-type", "BOGUS",
          *wait), 12, "unknown wallet type 'BOGUS'"),
        (("publish", "charge", "bo", "--feature", "image_generation", "--amount", "3"), 2,
         "a feature (its catalog cost) or an amount, not both"),
        (("history", "bo", "--type", "bogus"), 2, "unknown entry type 'bogus'"),
        (("dlq", "retry", "999"), 2, "no dead letter with id 999"),
        (("start", "bo", "image_generation", "--hold", "20"), 2,
         "'image_generation' has a fixed cost of 10"),
        (("start", "bo", "teleport"), 2, "unknown feature 'teleport'"),
        (("accounts", "open", "bo", "--plan", "Business"), 13,
         "account 'bo' exists with plan Professional"),
    ]
    for args, code, says in cases:
        done = cli(settings, *args, code=code)
        assert says in done.stdout + done.stderr, (args, done.stdout, done.stderr)
        assert "Value error" not in done.stderr
    cli(settings, "publish", "charge", "bo", "--feature", "image_generation", *wait)
    charges = json.loads(cli(settings, "history", "bo", "--type", "charge", "--json").stdout)
    assert [h["type"] for h in charges] == ["CHARGE"]
    assert cli(settings, "balance", "bo", "--json").stdout.count("BOGUS") == 0


def test_bad_input_is_refused_by_name_in_the_sdk(worker, client):
    client.open_account("sd", plan="Professional")
    with pytest.raises(ValidationFailed, match="unknown model 'nope'"):
        client.token_process_start("sd", "text_generation", model="nope")
    with pytest.raises(ValidationFailed, match="unknown feature 'teleport'"):
        client.token_process_start("sd", "teleport")
    with pytest.raises(ValidationFailed, match="fixed cost"):
        client.token_process_start("sd", "image_generation", hold=20)
    with pytest.raises(ValidationFailed, match="not both"):
        client.charge("sd", feature="image_generation", amount=3)
    bogus = client.result(client.credit("sd", 5, wallet_type="BOGUS"), timeout=30)
    assert (bogus.status, bogus.reason) == (
        "rejected", "unknown wallet type 'BOGUS' (the catalog declares STANDARD, PREMIUM, "
        "PROMO)")
    nope = client.result(client.token_process_end("sd", "text_generation", 1, 1,
                                                  model="nope"), timeout=30)
    assert nope.status == "rejected" and "unknown model 'nope'" in nope.reason
    with pytest.raises(AccountExists, match="exists with plan Professional"):
        client.open_account("sd", plan="Business")
    client.open_account("sd", plan="Professional")  # the same again is fine
    # A refused open leaves the default key free: the corrected retry opens the account.
    for _ in range(2):
        with pytest.raises(ValidationFailed, match="unknown plan 'gift'; one of Business"):
            client.open_account("sd2", plan="gift")
    client.open_account("sd2", plan="Gift")
    assert client.balance("sd2").plan == "Gift"
    # A key whose first use was refused (here by a published event) and is then reused
    # with another payload is a conflict, not "account not found".
    refused = client.result(client.publish({"type": "open_account", "key": "open:sd3",
                                            "user_id": "sd3", "plan": "Nope"}), timeout=30)
    assert (refused.status, refused.reason) == ("rejected", "unknown plan 'Nope'; one of "
                                                "Business, Free, Gift, Professional")
    with pytest.raises(Conflict, match="key 'open:sd3' was already used"):
        client.open_account("sd3", plan="Gift")


# -- flows ----------------------------------------------------------------------------------


def test_start_names_the_hold_and_end_settles_the_one_open_hold(worker, settings, db):
    cli(settings, "accounts", "open", "fl", "--plan", "Professional")
    started = cli(settings, "start", "fl", "text_generation", "--hold", "4")
    assert "accessible: hold #1 holds 4 token(s)" in started.stdout
    assert "--hold-id 1 ...)" in started.stdout.splitlines()[0]  # one line, not wrapped
    ended = cli(settings, "end", "fl", "text_generation", "--input-tokens", "100",
                "--output-tokens", "400", "--wait", "30", "--json")
    data = json.loads(ended.stdout)["data"]
    assert (data["hold_id"], data["hold"]) == (1, "settled")
    cli(settings, "start", "fl", "text_generation", "--hold", "2")
    cli(settings, "start", "fl", "text_generation", "--hold", "3")
    two = cli(settings, "end", "fl", "text_generation", "--input-tokens", "1",
              "--output-tokens", "1", "--wait", "30", code=12)
    assert "2 open holds for feature 'text_generation': #2, #3; name one with hold_id" \
        in two.stdout
    refused = cli(settings, "start", "fl", "text_generation", "--hold", "1000000", code=11)
    assert "Insufficient tokens" in refused.stdout
    first = json.loads(cli(settings, "start", "fl", "chat", "--key", "s-1", "--json").stdout)
    again = cli(settings, "start", "fl", "chat", "--key", "s-1", "--json", code=10)
    assert json.loads(again.stdout)["hold_id"] == first["hold_id"]
    assert json.loads(again.stdout)["replay"] is True and "replay" not in first
    assert "replay" in cli(settings, "start", "fl", "chat", "--key", "s-1", code=10).stdout
    cli(settings, "start", "fl", "chat", "--key", "s-1", "--max-output-tokens", "5", code=13)


def test_holds_release_gives_the_credits_back_and_refuses_twice(worker, settings, db):
    cli(settings, "accounts", "open", "hr", "--plan", "Professional")
    before = json.loads(cli(settings, "balance", "hr", "--json").stdout)["balance"]
    cli(settings, "start", "hr", "text_generation", "--hold", "7")
    released = cli(settings, "holds", "release", "1", "--wait", "30", "--json")
    data = json.loads(released.stdout)["data"]
    assert (data["hold"], data["released"], data["cost"]) == ("released", 7, 0)
    assert json.loads(cli(settings, "balance", "hr", "--json").stdout)["balance"] == before
    again = cli(settings, "holds", "release", "1", code=2)
    assert "hold #1 is already released" in one_line(again)
    assert "no hold #99" in one_line(cli(settings, "holds", "release", "99", code=2))


def test_accounts_list_show_change_plan_and_close(worker, settings, db, client):
    cli(settings, "accounts", "open", "ac1")
    cli(settings, "accounts", "open", "ac2", "--plan", "Gift")
    listed = json.loads(cli(settings, "accounts", "list", "--json").stdout)
    assert [(a["user_id"], a["plan"]) for a in listed] == [("ac1", "Free"), ("ac2", "Gift")]
    only = json.loads(cli(settings, "accounts", "list", "--plan", "Gift", "--json").stdout)
    assert [a["user_id"] for a in only] == ["ac2"]
    shown = json.loads(cli(settings, "accounts", "show", "ac1", "--json").stdout)
    assert (shown["plan"], shown["balance"], shown["closed_at"]) == ("Free", 5, None)
    assert "plan Free -> Business" in cli(settings, "accounts", "change-plan", "ac1",
                                          "Business").stdout
    assert "unknown plan 'Platinum'" in one_line(
        cli(settings, "accounts", "change-plan", "ac1", "Platinum", code=2))
    assert "closed at" in cli(settings, "accounts", "close", "ac1").stdout
    assert json.loads(cli(settings, "accounts", "show", "ac1", "--json").stdout)["closed_at"]
    charged = cli(settings, "publish", "charge", "ac1", "--amount", "1", "--wait", "30",
                  code=12)
    assert "account 'ac1' is closed" in charged.stdout
    refused = cli(settings, "start", "ac1", "chat", code=11)
    assert "Account is closed" in refused.stdout
    assert client.token_process_start("ac1", "chat").message == "Account is closed"
    assert "not found" in one_line(cli(settings, "accounts", "close", "nobody", code=2))


def test_version_and_help_on_every_option(settings):
    import click
    import typer.main

    from tokenledger.cli import app

    version = cli(settings, "--version")
    assert version.stdout.startswith("tokenledger ")
    missing = []

    def walk(command: click.Command, path: str) -> None:
        missing.extend(f"{path} {p.opts[0]}" for p in command.params
                       if isinstance(p, click.Option) and not p.hidden and not p.help)
        if not (command.help or "").strip():
            missing.append(path)
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, f"{path} {name}")

    walk(typer.main.get_command(app), "tokenledger")
    assert missing == [], missing
    for command in (("end", "--help"), ("holds", "release", "--help"),
                    ("accounts", "close", "--help")):
        assert cli(settings, *command).stdout


def test_conflicts_list_shows_the_publish_that_lost(worker, settings, db):
    cli(settings, "accounts", "open", "cf")
    cli(settings, "publish", "charge", "cf", "--amount", "1", "--key", "cf-1", "--wait", "30")
    cli(settings, "publish", "charge", "cf", "--amount", "2", "--key", "cf-1", "--wait", "30",
        code=13)
    (listed,) = json.loads(cli(settings, "conflicts", "list", "--json").stdout)
    assert (listed["key"], listed["payload"]["amount"]) == ("cf-1", 2)
    assert listed["stored"]["outcome"] == "applied"
    assert "cf-1" in cli(settings, "conflicts", "list").stdout


def test_two_ends_without_a_hold_id_in_one_batch_settle_the_one_hold_once(client, settings):
    from tests.support import apply, assert_verified

    client.open_account("bt", plan="Professional")
    started = client.token_process_start("bt", "text_generation", hold=5)
    end = {"type": "token_process_end", "user_id": "bt", "feature_endpoint_id": "text_generation",
           "input_tokens": 100, "output_tokens": 400}
    first, second = apply(settings, {**end, "key": "bt-1"}, {**end, "key": "bt-2"}).results
    assert (first.data["hold_id"], first.data["hold"]) == (started.hold_id, "settled")
    assert first.data["released"] == 5 and "hold_id" not in second.data
    assert_verified(settings)
