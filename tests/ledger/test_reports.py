"""Reports the dashboard reads, as worked examples: usage per day, usage values however
producers wrote them, history by keyset, and which features an account may use now."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest

from tests.support import apply
from tokenledger.db.uow import unit_of_work
from tokenledger.ledger.reports import affordability, history, statistics, usage
from tokenledger.timeutil import utcnow

pytestmark = pytest.mark.services


def open_(settings, user="u1", plan="Business"):
    apply(settings, {"type": "open_account", "key": f"open:{user}", "user_id": user,
                     "plan": plan})


def charge(settings, key, when=None, user="u1", **fields):
    result = apply(settings, {"type": "charge", "key": key, "user_id": user, **fields},
                   now=when)
    assert result.results[0].status == "applied", result.results[0]


def test_usage_counts_credits_per_feature_and_provider_cost_per_model_per_day(db):
    """Given two days of image charges and one LLM call priced by the catalog, usage puts
    each in its day, and its totals are the statistics' for the same period."""
    open_(db)
    now = utcnow()
    yesterday = now - timedelta(days=1)
    charge(db, "img-1", yesterday, feature="image_generation")
    charge(db, "img-2", now, feature="image_generation")
    charge(db, "img-3", now, feature="image_generation")
    apply(db, {"type": "token_process_end", "key": "llm-1", "user_id": "u1",
               "feature_endpoint_id": "text_generation", "input_tokens": 1000,
               "output_tokens": 2000, "model": "gemini-pro"}, now=yesterday)
    start = now - timedelta(days=2)
    end = now + timedelta(minutes=1)
    with unit_of_work(db) as uow:
        every = usage(uow.session, start, end, uow.catalog)
        mine = usage(uow.session, start, end, uow.catalog, user_id="u1")
        stats = statistics(uow.session, "u1", start, end, catalog=uow.catalog)
    assert every["by_model"] == mine["by_model"] == stats["by_model"]
    assert every["margin"] == stats["margin"]
    days = every["days"]
    assert len(days) == 3 and days[-1] == end.date().isoformat()
    image = every["credits_by_feature"]["image_generation"]
    assert image[days.index(yesterday.date().isoformat())] == 10
    assert image[days.index(now.date().isoformat())] == 20
    # 1000 input + 2000 output at the catalog's provider prices (0.000125 and 0.000375 per
    # 1k), on the day of the call.
    cost = every["provider_cost_by_model"]["gemini-pro"]
    assert cost[days.index(yesterday.date().isoformat())] == pytest.approx(0.000875)
    assert sum(cost) == pytest.approx(0.000875)
    assert every["by_feature"]["image_generation"] == 30


def test_usage_values_are_read_alike_however_producers_wrote_them(db):
    """Charges carrying producer-written metadata: plain numbers are summed on the server,
    anything else is parsed one by one; a value that is no number counts as absent."""
    open_(db)
    metas = [
        {"model": "m1", "input_tokens": 100, "output_tokens": "200", "provider_cost": "0.5",
         "exact_cost": "2.4"},                                   # plain: summed by the server
        {"model": "m1", "input_tokens": " 7 ", "output_tokens": 1e3, "provider_cost": "1e-1",
         "exact_cost": "NaN"},                                   # parsed in Python
        {"model": "m1", "input_tokens": -5, "output_tokens": [1], "provider_cost": "-1",
         "exact_cost": "n"},                                     # no usable value
        {"model": "m1", "input_tokens": "12.9", "provider_cost": True},
    ]
    for n, meta in enumerate(metas):
        charge(db, f"c{n}", amount=3, metadata=meta)
    with unit_of_work(db) as uow:
        m1 = statistics(uow.session, "u1", catalog=uow.catalog)["by_model"]["m1"]
    assert m1["operations"] == 4 and m1["credits_charged"] == 12
    assert m1["input_tokens"] == 100 + 7 + 0 + 12
    assert m1["output_tokens"] == 200 + 1000
    assert Decimal(str(m1["provider_cost"])) == Decimal("0.6")
    assert m1["priced"] == 2
    # An unknown model has no markup: what was charged without an exact cost counts as is.
    assert m1["exact_cost"] == 2.4 and m1["base_credits"] == pytest.approx(2.4 + 9)


def test_history_pages_by_keyset_both_ways(db):
    open_(db)
    for n in range(7):
        charge(db, f"c{n}", amount=1)
    with unit_of_work(db) as uow:
        s = uow.session
        newest = history(s, "u1", limit=3)
        older = history(s, "u1", limit=3, before=newest[-1]["id"])
        back = history(s, "u1", limit=3, after=older[0]["id"])
        oldest = history(s, "u1", limit=3, before=older[-1]["id"])
    ids = [r["id"] for r in newest + older + oldest]
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == 8
    assert back == newest
    assert [r["type"] for r in oldest][-1] == "OPEN"


def test_a_free_account_may_use_its_plans_features_while_it_has_tokens(db):
    open_(db, plan="Free")
    with unit_of_work(db) as uow:
        ready = {f["feature"]: f for f in affordability(uow.session, "u1", uow.catalog,
                                                        uow.now)}
    assert "image_generation" not in ready  # not in the Free plan
    assert ready["project_creation"]["can_afford"] and ready["chat"]["cost"] == 0
    assert ready["chatgpt_message"]["can_afford"]  # 5 tokens for 5
    for n in range(5):
        charge(db, f"p{n}", feature="project_creation")
    with unit_of_work(db) as uow:
        ready = {f["feature"]: f for f in affordability(uow.session, "u1", uow.catalog,
                                                        uow.now)}
    assert not ready["project_creation"]["can_afford"]
    assert ready["project_creation"]["reason"] == "Insufficient tokens (required 1, available 0)"
    assert ready["chat"]["can_afford"]  # free features stay ready
