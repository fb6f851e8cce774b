"""The completion rule: an end whose provider reported no usage settles by the feature's
``on_incomplete`` (charge the hold, or release it) and its outcome says ``incomplete``;
each process settles exactly once."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import select

from tests.support import apply, assert_verified, balances_by_user, session_scope
from tests.tokenprocess.test_extend import opened
from tokenledger import LedgerClient, Settings
from tokenledger.catalog.service import REFRESH_SECONDS, default_catalog_text, load_catalog
from tokenledger.ledger.models import LedgerEntry
from tokenledger.tokenprocess.models import Hold

pytestmark = pytest.mark.services


def ended(settings: Settings, user: str, feature: str, hold_id: int, key: str,
          **extra) -> dict:
    result = apply(settings, {"type": "token_process_end", "key": key, "user_id": user,
                              "feature_endpoint_id": feature, "input_tokens": 0,
                              "output_tokens": 0, "hold_id": hold_id, **extra}).results[0]
    assert result.status == "applied", result
    return result.data


@pytest.fixture
def release_rule(db: Settings):
    """code_generation released when incomplete, for the test; the default after it."""
    text = default_catalog_text().replace('default_model = "gpt-4o"',
                                          'default_model = "gpt-4o"\non_incomplete = "release"')
    with session_scope(db) as s:
        load_catalog(s, text, "release.toml")
    yield
    with session_scope(db) as s:
        load_catalog(s, default_catalog_text(), "packaged default")
    time.sleep(REFRESH_SECONDS + 0.2)  # until running workers have re-read it too


def test_no_usage_charges_the_hold_by_default(client: LedgerClient, db: Settings) -> None:
    user = opened(db)
    start = client.token_process_start(user, "text_generation", hold=20)
    data = ended(db, user, "text_generation", start.hold_id, "inc-1", usage_reported=False)
    assert (data["outcome"], data["on_incomplete"], data["cost"], data["charged"]) == \
        ("incomplete", "charge_hold", 20, 20)
    assert balances_by_user(db)[user] == 80
    with session_scope(db) as s:
        assert s.get(Hold, start.hold_id).status == "settled"
    # A second end of the same hold is refused: one settlement per process.
    again = apply(db, {"type": "token_process_end", "key": "inc-2", "user_id": user,
                       "feature_endpoint_id": "text_generation", "input_tokens": 5,
                       "output_tokens": 5, "hold_id": start.hold_id}).results[0]
    assert again.status == "rejected" and "already settled" in again.reason
    assert_verified(db)


def test_reported_zero_usage_still_releases(client: LedgerClient, db: Settings) -> None:
    user = opened(db)
    start = client.token_process_start(user, "text_generation", hold=20)
    data = ended(db, user, "text_generation", start.hold_id, "zero")
    assert data["cost"] == 0 and "outcome" not in data
    assert balances_by_user(db)[user] == 100


def test_the_release_rule_gives_the_hold_back(client: LedgerClient, db: Settings,
                                              release_rule) -> None:
    user = opened(db)
    start = client.token_process_start(user, "code_generation", hold=10)
    data = ended(db, user, "code_generation", start.hold_id, "inc-r", usage_reported=False)
    assert (data["outcome"], data["on_incomplete"], data["cost"]) == ("incomplete", "release", 0)
    assert balances_by_user(db)[user] == 100
    with session_scope(db) as s:
        assert s.get(Hold, start.hold_id).status == "released"
        assert not s.scalars(select(LedgerEntry).where(LedgerEntry.type == "CHARGE")).all()
    assert_verified(db)


def test_the_context_manager_reports_no_usage_as_incomplete(worker, client: LedgerClient,
                                                            db: Settings) -> None:
    user = opened(db)
    with client.token_process(user, "text_generation", hold=7) as usage:
        pass  # the provider answered, but reported no usage
    outcome = usage.outcome(timeout=30)
    assert (outcome.data["outcome"], outcome.data["cost"]) == ("incomplete", 7)
    assert balances_by_user(db)[user] == 93
    assert_verified(db)


def test_the_decorator_without_usage_in_its_answer_is_incomplete(worker, client: LedgerClient,
                                                                 db: Settings) -> None:
    user = opened(db)
    ends: list[str] = []

    @client.token_process(user, "text_generation", hold=4)
    def generate() -> dict:
        return {"text": "hello", "model": "gpt-4o"}  # the provider gave no usage

    original = client.token_process_end

    def spy(*args, **kwargs):
        ends.append(key := original(*args, **kwargs))
        return key

    client.token_process_end = spy  # type: ignore[method-assign]
    generate()
    outcome = client.result(ends[0], timeout=30)
    assert (outcome.data["outcome"], outcome.data["cost"]) == ("incomplete", 4)
    assert balances_by_user(db)[user] == 96
