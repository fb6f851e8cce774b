"""The SDK examples, run as written: the README's streaming worked example (balance 50, a
stream that would cost 80, stopped at 50) and docs/sdk.md's seed 004 usage examples in
Python."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select

from tests.sdk.clients import api_server, ledger
from tests.support import ROOT, apply, assert_verified, session_scope
from tokenledger import LedgerClient, Settings
from tokenledger.ledger.models import LedgerEntry
from tokenledger.timeutil import utcnow

__all__ = ["api_server", "ledger"]  # fixtures used by name
pytestmark = pytest.mark.services


# Where each example lives: the worked example in the README, the seeds' in docs/sdk.md.
EXAMPLES = {"streaming": "README.md", "seeds": "docs/sdk.md"}


def readme_block(name: str) -> str:
    """The python block after ``<!-- readme-example: name -->`` in its file."""
    text = (ROOT / EXAMPLES[name]).read_text("utf-8")
    found = re.findall(rf"<!-- readme-example: {name} -->\n```python\n(.*?)```", text, re.S)
    assert len(found) == 1, (name, EXAMPLES[name], len(found))
    return found[0]


def run_block(name: str, **names: Any) -> dict[str, Any]:
    scope: dict[str, Any] = dict(names)
    exec(compile(readme_block(name), f"{EXAMPLES[name]}:{name}", "exec"), scope)  # noqa: S102
    return scope


def test_the_streaming_worked_example(worker, client: LedgerClient, db: Settings) -> None:
    scope = run_block("streaming", client=client)
    assert len(scope["shown"]) < 167  # the stream was cut off
    assert scope["outcome"].data["status"] == "returnable"
    assert_verified(db)


def test_the_seed_examples(worker, ledger, db: Settings) -> None:
    """Sync and async clients alike (``ledger``)."""
    client = ledger
    ex = run_block("seeds")
    now = utcnow()
    client.open_account("reader", plan="Gift")

    def image(prompt: str) -> str:
        return f"https://images.example/{prompt}.png"

    done = ex["handle_image_generation"](client, "reader", "cat", image)
    assert (done["tokens_charged"], done["remaining_balance"]) == (10, 90)

    def broken(prompt: str) -> str:
        raise TimeoutError("the model timed out")

    with pytest.raises(TimeoutError):
        ex["handle_image_generation"](client, "reader", "dog", broken)
    assert client.balance("reader").balance == 90  # refunded

    assert ex["handle_chat_message"](client, "reader", "hi")["remaining_balance"] == 85
    client.open_account("poor")  # Free: 5
    assert ex["handle_chat_message"](client, "poor", "hi")["remaining_balance"] == 0
    refused = ex["handle_chat_message"](client, "poor", "again")
    assert (refused["error"], refused["deficit"], refused["balance"]) == \
        ("Insufficient tokens", 5, 0)
    with pytest.raises(RuntimeError, match="Insufficient tokens. You need 10"):
        ex["handle_image_generation"](client, "poor", "cat", image)  # not in Free either

    page = ex["transaction_history"](client, "reader")
    types = [e["type"] for e in page["entries"]]
    assert types == ["CHARGE", "REFUND", "CHARGE", "CHARGE", "OPEN"]
    assert page["entries"][0]["balance_after"] == 85

    stats = ex["usage_statistics"](client, "reader", now - timedelta(hours=1),
                                   now + timedelta(hours=1))
    assert (stats["total_spent"], stats["operations"]) == (25, 5)  # open, 3 charges, refund
    assert stats["net_change"] == 85 and stats["total_earned"] == 100

    report = ex["monthly_report"](client, "reader", now - timedelta(hours=1),
                                  now + timedelta(hours=1))
    assert report["breakdown"] == {
        "image_generation": {"count": 2, "tokens_spent": 20},
        "chatgpt_message": {"count": 1, "tokens_spent": 5}}

    # A renewal is refused within the period, and granted once when it is over.
    refused = ex["renew_user_manually"](client, "reader")
    assert refused["success"] is False and refused["days_until_renewal"] == 30
    apply(db, {"type": "open_account", "key": "open:old", "user_id": "old", "plan": "Gift"},
          now=now - timedelta(days=31))
    client.charge("old", amount=60)
    renewed = ex["renew_user_manually"](client, "old")
    assert renewed.success and renewed.new_balance == 100
    assert ex["renew_user_manually"](client, "old")["success"] is False
    assert client.renew("old").success is False  # once per period

    reset = ex["correct_balance"](client, "reader", 500, "support ticket 42")
    assert (reset.previous_balance, reset.new_balance, reset.change) == (85, 500, 415)
    assert client.balance("reader").balance == 500
    down = client.reset_balance("reader", 0, "fraud")
    assert (down.change, client.balance("reader").balance) == (-500, 0)
    with session_scope(db) as s:
        audit = s.scalars(select(LedgerEntry.metadata_).where(
            LedgerEntry.type == "ADJUSTMENT").order_by(LedgerEntry.id)).all()
    assert [(m["reason"], m["previous_balance"], m["new_balance"]) for m in audit] == \
        [("support ticket 42", 85, 500), ("fraud", 500, 0)]
    assert_verified(db)
