"""Property: any sequence of opens, charges, credits and refunds, with redeliveries and
conflicting reuses of keys, leaves the ledger equal to a simple model and verify clean."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from tests.support import apply, assert_verified, balances_by_user, session_scope
from tokenledger.db.schema import ledger_tables

pytestmark = pytest.mark.services

USERS = ["ann", "bob", "cyd"]

op = st.one_of(
    st.tuples(st.just("open"), st.sampled_from(USERS), st.sampled_from(["Free", "Gift"])),
    st.tuples(st.just("charge"), st.sampled_from(USERS), st.integers(1, 60)),
    st.tuples(st.just("credit"), st.sampled_from(USERS), st.integers(1, 80)),
    st.tuples(st.just("refund"), st.integers(0, 40), st.one_of(st.none(), st.integers(1, 30))),
    st.tuples(st.just("redeliver"), st.integers(0, 40)),
    st.tuples(st.just("conflict"), st.integers(0, 40)),
)


@dataclass
class Model:
    balances: dict[str, int] = field(default_factory=dict)
    charges: dict[str, tuple[str, int]] = field(default_factory=dict)  # key -> (user, amount)
    refunded: dict[str, int] = field(default_factory=dict)
    seen: dict[str, dict] = field(default_factory=dict)  # key -> payload applied/stored

    def step(self, event: dict) -> str:
        key, user = event["key"], event["user_id"]
        if key in self.seen:
            return "duplicate" if self.seen[key] == event else "conflict"
        kind = event["type"]
        if kind == "open_account":
            self.seen[key] = event
            if user in self.balances:
                return "rejected"
            self.balances[user] = 100 if event["plan"] == "Gift" else 5
            return "applied"
        if user not in self.balances:
            return "dead_lettered"  # not stored: a later redelivery tries again
        self.seen[key] = event
        if kind == "credit":
            self.balances[user] += event["amount"]
            return "applied"
        if kind == "charge":
            if event["amount"] > self.balances[user]:
                return "declined"
            self.balances[user] -= event["amount"]
            self.charges[key] = (user, event["amount"])
            return "applied"
        original = event["original_key"]
        if original not in self.seen:
            del self.seen[key]
            return "deferred"  # its charge was never stored (e.g. dead-lettered): wait
        if original not in self.charges or self.charges[original][0] != user:
            return "rejected"
        left = self.charges[original][1] - self.refunded.get(original, 0)
        amount = event.get("amount", left)
        if left <= 0 or amount > left:
            return "rejected"
        self.refunded[original] = self.refunded.get(original, 0) + amount
        self.balances[user] += amount
        return "applied"


def build(ops: list[tuple]) -> list[dict]:
    events: list[dict] = []
    for n, o in enumerate(ops):
        kind = o[0]
        if kind == "open":
            events.append({"type": "open_account", "key": f"e{n}", "user_id": o[1],
                           "plan": o[2]})
        elif kind == "charge":
            events.append({"type": "charge", "key": f"e{n}", "user_id": o[1], "amount": o[2]})
        elif kind == "credit":
            events.append({"type": "credit", "key": f"e{n}", "user_id": o[1], "amount": o[2]})
        elif kind == "refund":
            charges = [e for e in events if e["type"] == "charge"]
            if charges:
                target = charges[o[1] % len(charges)]
                refund = {"type": "refund", "key": f"e{n}", "user_id": target["user_id"],
                          "original_key": target["key"]}
                if o[2] is not None:
                    refund["amount"] = o[2]
                events.append(refund)
        elif events:
            earlier = dict(events[o[1] % len(events)])
            if kind == "conflict" and "amount" in earlier:
                earlier["amount"] += 1
            events.append(earlier)
    return events


@pytest.mark.slow
@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ops=st.lists(op, min_size=1, max_size=40), cuts=st.lists(st.integers(1, 8), max_size=10))
def test_any_sequence_with_redeliveries_matches_the_model(db, ops, cuts):
    with session_scope(db) as session:
        session.execute(text(f"TRUNCATE {', '.join(ledger_tables())} RESTART IDENTITY CASCADE"))
    events = build(ops)
    model = Model()
    expected = [model.step(e) for e in events]
    got: list[str] = []
    i = 0
    for size in [*cuts, len(events)]:  # random batch boundaries
        chunk = events[i:i + size]
        if chunk:
            got += [r.status for r in apply(db, *chunk).results]
        i += size
        if i >= len(events):
            break
    assert got == expected
    assert balances_by_user(db) == model.balances
    assert_verified(db)
