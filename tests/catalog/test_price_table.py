"""A price table prices a new model without a code or catalog change."""

from __future__ import annotations

import json
import time
import uuid
from decimal import Decimal

import pytest

from tests.support import apply, assert_verified, run_cli, session_scope
from tokenledger import Settings
from tokenledger.catalog.prices import parse_price_table
from tokenledger.catalog.service import (
    REFRESH_SECONDS,
    current_catalog,
    default_catalog_text,
    load_catalog,
)
from tokenledger.errors import CatalogError

pytestmark = pytest.mark.services


@pytest.fixture
def restore_catalog(db: Settings):
    yield
    with session_scope(db) as s:
        load_catalog(s, default_catalog_text(), "packaged default")
    time.sleep(REFRESH_SECONDS + 0.2)


def test_provider_prices_become_credit_prices() -> None:
    models = parse_price_table(
        'credit_value = 0.001\nprofit_percent = 20\n[models.m]\n'
        'provider_input_per_1k = 0.003\nprovider_output_per_1k = 0.015\n', "t.toml")
    m = models["m"]
    assert (m.input_weight, m.output_weight, m.tokens_per_credit, m.profit_percent) == \
        (1, 5, Decimal("333.3333"), 20)
    with pytest.raises(CatalogError, match="models.x: give tokens_per_credit"):
        parse_price_table('{"models": {"x": {"provider_input_per_1k": 1}}}', "t.json")
    with pytest.raises(CatalogError, match="t.json"):
        parse_price_table('{"models": {"x": {"tokens_per_credit": 0}}}', "t.json")


def test_a_new_model_is_priced_from_a_table(db: Settings, tmp_path, restore_catalog) -> None:
    table = tmp_path / "prices.json"
    table.write_text(json.dumps({
        "credit_value": 0.001, "profit_percent": 20,
        "models": {"claude-sonnet-4": {"provider_input_per_1k": 0.003,
                                       "provider_output_per_1k": 0.015}}}))
    done = run_cli(db, "catalog", "prices", str(table), "--json")
    assert done.exit_code == 0, done.stdout + done.stderr
    assert "claude-sonnet-4" in json.loads(done.stdout)["models"]
    with session_scope(db) as s:
        catalog = current_catalog(s)
    assert {"claude-sonnet-4", "gemini-pro", "gpt-4"} <= set(catalog.models)
    user = f"p-{uuid.uuid4().hex[:8]}"
    apply(db, {"type": "open_account", "key": f"open:{user}", "user_id": user, "plan": "Gift"})
    # 1,000 in + 1,000 out: $0.003 + $0.015 = 18 credits of $0.001, +20 % = 21.6 -> 22.
    ended = apply(db, {"type": "token_process_end", "key": f"end:{user}", "user_id": user,
                       "feature_endpoint_id": "text_generation", "input_tokens": 1000,
                       "output_tokens": 1000, "model": "claude-sonnet-4"}).results[0]
    assert (ended.data["model"], ended.data["cost"]) == ("claude-sonnet-4", 22)
    bad = tmp_path / "bad.toml"
    bad.write_text("[models.x]\ntokens_per_credit = -1\n")
    refused = run_cli(db, "catalog", "prices", str(bad))
    assert refused.exit_code == 2 and "price table refused" in refused.stderr
    assert_verified(db)
