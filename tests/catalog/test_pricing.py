"""Pricing as worked examples (SPEC §2 "Pricing"); pure functions, no services needed."""

from __future__ import annotations

from decimal import Decimal

import pytest

from tokenledger.catalog.pricing import ceil_credits, estimate_hold, price_usage, usage_cost
from tokenledger.catalog.service import Catalog, ModelSpec, default_catalog_text, parse_catalog


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    spec = parse_catalog(default_catalog_text())
    return Catalog(1, spec.default_plan, dict(spec.plans), dict(spec.features),
                   dict(spec.models))


def test_the_seeds_worked_example_100_input_400_output_on_gemini_pro_costs_3(catalog):
    # (100 × 1 + 400 × 4) / 1000 × 1.2 = 2.04 → rounded up to 3
    price = price_usage(catalog, catalog.features["text_generation"], 100, 400, "gemini-pro")
    assert price.cost == 3
    assert price.exact == Decimal("2.04")
    assert price.model == "gemini-pro"
    # provider: 0.1k × 0.000125 + 0.4k × 0.000375
    assert price.provider_cost == Decimal("0.0001625")
    assert price.metadata() == {"exact_cost": "2.04", "model": "gemini-pro",
                                "provider_cost": "0.0001625"}


def test_an_exact_whole_cost_is_not_rounded_up_by_float_error():
    # 10 credits × 1.1 is 11.000000000000002 in binary floating point: ceil would say 12.
    spec = ModelSpec(tokens_per_credit=Decimal(100), profit_percent=Decimal(10))
    exact = usage_cost(spec, 200, 200)  # (200 + 800) / 100 = 10 → × 1.1
    assert exact == Decimal("11.0")
    assert ceil_credits(exact) == 11
    assert ceil_credits(Decimal("11.0000001")) == 12


def test_weights_default_to_the_seeds_1_to_4_ratio():
    spec = ModelSpec(tokens_per_credit=Decimal(1))
    assert usage_cost(spec, 1, 0) == 1
    assert usage_cost(spec, 0, 1) == 4


def test_an_unknown_model_is_priced_as_the_features_default_model(catalog):
    feature = catalog.features["text_generation"]
    unknown = price_usage(catalog, feature, 100, 400, "llama-99")
    assert (unknown.cost, unknown.model, unknown.requested_model) == (3, "gemini-pro",
                                                                      "llama-99")
    assert unknown.metadata()["requested_model"] == "llama-99"


def test_another_known_model_uses_its_own_price(catalog):
    # gpt-4o: (1000 + 4 × 1000) / 500 × 1.3 = 13
    price = price_usage(catalog, catalog.features["text_generation"], 1000, 1000, "gpt-4o")
    assert (price.cost, price.exact) == (13, Decimal("13.0"))


def test_usage_never_costs_less_than_the_features_minimum(catalog):
    # code_generation (min 2) on gpt-4o: 10 input tokens → 0.026 → 1, floored to 2
    price = price_usage(catalog, catalog.features["code_generation"], 10, 0, None)
    assert (price.cost, price.minimum_applied, price.model) == (2, True, "gpt-4o")


def test_no_tokens_cost_nothing_even_for_fixed_cost_features(catalog):
    assert price_usage(catalog, catalog.features["text_generation"], 0, 0).cost == 0
    assert price_usage(catalog, catalog.features["image_generation"], 0, 0).cost == 0


def test_fixed_cost_features_cost_their_catalog_cost(catalog):
    assert price_usage(catalog, catalog.features["image_generation"], 5, 5000).cost == 10
    assert price_usage(catalog, catalog.features["chat"], 5, 5).cost == 0


def test_the_hold_estimate(catalog):
    text = catalog.features["text_generation"]
    code = catalog.features["code_generation"]
    # explicit wins; then max_output_tokens priced (input unknown: 0); then the minimum
    assert estimate_hold(catalog, text, max_output_tokens=None, hold=7, model=None) == 7
    # 4 × 2000 / 1000 × 1.2 = 9.6 → 10
    assert estimate_hold(catalog, text, max_output_tokens=2000, hold=None, model=None) == 10
    # gpt-4o-mini: 4 × 2000 / 4000 × 1.3 = 2.6 → 3
    assert estimate_hold(catalog, text, max_output_tokens=2000, hold=None,
                         model="gpt-4o-mini") == 3
    assert estimate_hold(catalog, code, max_output_tokens=1, hold=None, model=None) == 2
    assert estimate_hold(catalog, text, max_output_tokens=None, hold=None, model=None) == 1
    # fixed-cost features hold their cost
    assert estimate_hold(catalog, catalog.features["image_generation"],
                         max_output_tokens=99999, hold=1, model=None) == 10
