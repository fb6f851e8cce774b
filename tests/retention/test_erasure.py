"""Erasing a person: the user id becomes a stable pseudonym in every table, producers'
free text goes, every amount stays — verify passes and the reports add up as before."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import text

from tests.api.support import ServerThread
from tests.support import apply, assert_verified, run_cli, session_scope
from tokenledger import LedgerClient, Settings
from tokenledger.apikeys.service import create_key
from tokenledger.db.schema import Base
from tokenledger.db.uow import unit_of_work
from tokenledger.errors import AccountNotFound, ConfigurationError, ValidationFailed
from tokenledger.ledger.reports import history, statistics
from tokenledger.messages import StartRequest
from tokenledger.notify.service import set_threshold
from tokenledger.retention.erasure import pseudonym_of
from tokenledger.tokenprocess import service as token_process
from tokenledger.webhooks.service import add_endpoint

pytestmark = pytest.mark.services

SECRET = "test erasure secret"
PERSON = "alice.personal@example.com"


@pytest.fixture
def erasing(db: Settings) -> Settings:
    return db.model_copy(update={"erasure_secret": SecretStr(SECRET)})


def a_life(settings: Settings, user: str) -> None:
    """Given an account that was charged with free-text metadata, refunded with a reason,
    used an LLM feature (a model's tokens, priced), conflicted, dead-lettered, went low
    under its own threshold, and was announced to a webhook endpoint."""
    with unit_of_work(settings) as uow:
        add_endpoint(uow.session, "http://127.0.0.1:9/hooks",
                     ["balance_changed", "balance_low"], None, uow.now)
    apply(settings, {"type": "open_account", "key": f"open:{user}", "user_id": user,
                     "plan": "Professional"})
    with unit_of_work(settings) as uow:
        set_threshold(uow.session, user, 1990, uow.now)
    apply(settings,
          {"type": "charge", "key": "c1", "user_id": user, "feature": "image_generation",
           "metadata": {"note": f"portrait of {user}", "ticket": 42}},
          {"type": "refund", "key": "r1", "user_id": user, "original_key": "c1", "amount": 4,
           "reason": f"{user} complained"},
          {"type": "credit", "key": "k1", "user_id": user, "amount": 50,
           "reason": "birthday gift for Alice"},
          {"type": "charge", "key": "c2", "user_id": user, "amount": 3,
           "metadata": {"name": "Alice Personal"}})
    with unit_of_work(settings) as uow:
        started = token_process.start(uow, StartRequest(
            user_id=user, feature_endpoint_id="text_generation", max_output_tokens=200), "h1")
    apply(settings, {"type": "token_process_end", "key": "e1", "user_id": user,
                     "feature_endpoint_id": "text_generation", "input_tokens": 1200,
                     "output_tokens": 800, "hold_id": started.hold_id,
                     "metadata": {"prompt": "write to Alice"}},
          {"type": "charge", "key": "c2", "user_id": user, "amount": 7},  # a conflict
          {"type": "charge", "key": "c3", "user_id": "someone else", "amount": 1})
    apply(settings, {"type": "charge", "key": "c4", "user_id": user, "amount": 100})


def rows_naming(settings: Settings, needle: str) -> dict[str, int]:
    """How many rows of each table hold ``needle`` anywhere (as text)."""
    found = {}
    with session_scope(settings) as session:
        for table in Base.metadata.sorted_tables:
            count = session.scalar(text(
                f'SELECT count(*) FROM "{table.name}" AS t WHERE strpos(CAST(t AS text), :n) > 0'),
                {"n": needle})
            if count:
                found[table.name] = count
    return found


def numbers(report: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in report.items() if k != "user_id"}


def test_an_erased_account_keeps_every_amount_under_a_pseudonym(erasing: Settings) -> None:
    a_life(erasing, PERSON)
    assert set(rows_naming(erasing, PERSON)) >= {
        "accounts", "ledger_entries", "event_outcomes", "event_conflicts", "holds",
        "low_balance_state", "account_thresholds", "webhook_deliveries"}
    with session_scope(erasing) as session:
        before = statistics(session, PERSON)
        entries_before = history(session, PERSON, limit=100)
    assert before["by_model"] and before["total_refunded"] == 4

    with LedgerClient(erasing) as client:
        balance = client.balance(PERSON)
        erased = client.erase_account(PERSON, erased_by="test: dpo@example.com")
        assert erased.pseudonym == pseudonym_of(SECRET, PERSON)
        assert not erased.already_erased
        # Then: the person appears nowhere, not even in their free text...
        assert rows_naming(erasing, PERSON) == {}
        for word in ("portrait", "complained", "birthday", "Alice Personal", "write to"):
            assert rows_naming(erasing, word) == {}, word
        # ...every amount, balance and report is what it was, under the pseudonym...
        assert_verified(erasing)
        with session_scope(erasing) as session:
            assert numbers(statistics(session, erased.pseudonym)) == numbers(before)
            after = history(session, erased.pseudonym, limit=100)
        assert [(e["id"], e["amount"], e["balance_after"], e["type"], e["event_key"])
                for e in after] == [
            (e["id"], e["amount"], e["balance_after"], e["type"],
             f"open:{erased.pseudonym}" if e["event_key"] == f"open:{PERSON}"
             else e["event_key"]) for e in entries_before]
        settled = next(e for e in after if e["event_key"] == "e1")
        assert {"model", "input_tokens", "output_tokens", "exact_cost"} <= set(
            settled["metadata"]) and "prompt" not in settled["metadata"]
        now = client.balance(erased.pseudonym)
        assert (now.balance, now.wallets) == (balance.balance, balance.wallets)
        # ...and the erasure log names the pseudonym, who, when — not the person.
        with session_scope(erasing) as session:
            log = session.execute(text("SELECT pseudonym, erased_by, rows FROM erasures")).all()
        assert [(p, by) for p, by, _ in log] == [(erased.pseudonym, "test: dpo@example.com")]
        assert log[0].rows["outcomes"] >= 6 and log[0].rows["dead_letters"] == 0

        # Erasing again is the same erasure; an event for the old id finds no account.
        again = client.erase_account(PERSON)
        assert (again.already_erased, again.pseudonym, again.erased_at) == (
            True, erased.pseudonym, erased.erased_at)
        result = apply(erasing, {"type": "charge", "key": "late", "user_id": PERSON,
                                 "amount": 1})
        assert result.results[0].status == "dead_lettered"
        with pytest.raises(AccountNotFound):
            client.erase_account("never-existed")
        # Opened again under the same id, it cannot take the same pseudonym.
        apply(erasing, {"type": "open_account", "key": "reopen", "user_id": PERSON})
        with pytest.raises(ValidationFailed, match="^user_id: .* erased before and opened"):
            client.erase_account(PERSON)


def test_a_dead_letter_and_a_renewal_error_naming_the_person_are_rewritten(
        erasing: Settings) -> None:
    user = "bob-personal"
    apply(erasing, {"type": "open_account", "key": f"open:{user}", "user_id": user})
    with session_scope(erasing) as session:  # a message that failed validation
        session.execute(text(
            "INSERT INTO dead_letters (fingerprint, key, payload, reason, attempts)"
            " VALUES ('f1', 'x', :p, 'amount: bad', 1), ('f2', 'y', :q, 'not JSON', 1)"),
            {"p": json.dumps([{"type": "charge", "user_id": user, "amount": -1,
                               "metadata": {"why": "Bob's card"}},
                              {"type": "charge", "user_id": "other", "amount": 1,
                               "metadata": {"kept": True}}]),
             "q": f'{{"user_id": "{user}", broken'})
    result = run_cli(erasing, "accounts", "erase", user, "--json",
                     TOKENLEDGER_ERASURE_SECRET=SECRET)
    assert result.exit_code == 0, result.stderr
    erased = json.loads(result.stdout)
    assert erased["erased_by"].startswith("cli:") and erased["rows"]["dead_letters"] == 2
    assert rows_naming(erasing, user) == {} and rows_naming(erasing, "Bob's card") == {}
    assert rows_naming(erasing, "kept") == {"dead_letters": 1}  # another user's, kept
    assert_verified(erasing)


def test_erasing_needs_the_secret(db: Settings) -> None:
    apply(db, {"type": "open_account", "key": "open:carol", "user_id": "carol"})
    with pytest.raises(ConfigurationError, match="TOKENLEDGER_ERASURE_SECRET"):
        LedgerClient(db).erase_account("carol")
    result = run_cli(db, "accounts", "erase", "carol")
    assert result.exit_code == 1 and "TOKENLEDGER_ERASURE_SECRET" in result.stderr
    assert "accounts" in rows_naming(db, "carol")  # nothing was erased


@pytest.fixture
def erasing_api(erasing: Settings) -> Iterator[ServerThread]:
    server = ServerThread(erasing).start()
    yield server
    server.stop()


def test_the_admin_api_erases(erasing: Settings, erasing_api: ServerThread) -> None:
    apply(erasing, {"type": "open_account", "key": "open:dave", "user_id": "dave"})
    with session_scope(erasing) as session:
        admin = create_key(session, "admin", "privacy officer").key
        reader = create_key(session, "reader", "reports").key
    with httpx.Client(base_url=erasing_api.url, timeout=30) as http:
        denied = http.post("/api/accounts/dave/erase", headers={"x-server-api-key": reader})
        assert denied.status_code == 403
        done = http.post("/api/accounts/dave/erase", headers={"x-server-api-key": admin})
        assert done.status_code == 200, done.text
        data = done.json()["data"]
        assert data["pseudonym"] == pseudonym_of(SECRET, "dave")
        assert data["erased_by"].startswith("api-key:") and "privacy officer" in data["erased_by"]
        again = http.post("/api/accounts/dave/erase", headers={"x-server-api-key": admin})
        assert again.json()["data"]["already_erased"] is True
        missing = http.post("/api/accounts/nobody/erase", headers={"x-server-api-key": admin})
        assert missing.status_code == 404
    assert rows_naming(erasing, "dave") == {}
