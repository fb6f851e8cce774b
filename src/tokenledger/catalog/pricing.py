"""Pricing: how a feature's use turns into whole credits (SPEC §2 "Pricing").

Usage-priced features:
``cost = ceil((input × input_weight + output × output_weight) / tokens_per_credit
× (1 + profit_percent / 100))``, in exact decimal arithmetic, never below the feature's
``min_cost``. Fixed-cost features cost their catalog ``cost``. Using nothing (0 input and
0 output tokens) costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_CEILING, Context, Decimal
from typing import Any

from tokenledger.catalog.service import Catalog, FeatureSpec, ModelSpec

# Token counts go up to 1e10 and weights carry 4 decimals: 50 digits is far more than
# enough, and a local context keeps the caller's decimal settings out of it.
_CTX = Context(prec=50)
_HUNDRED = Decimal(100)
_THOUSAND = Decimal(1000)


@dataclass(frozen=True, slots=True)
class Price:
    """The price of one use: whole credits, and how they were arrived at."""

    cost: int
    exact: Decimal
    model: str | None = None
    requested_model: str | None = None
    provider_cost: Decimal | None = None
    minimum_applied: bool = False

    def metadata(self) -> dict[str, Any]:
        """JSON-ready facts for the ledger entry; decimals as strings so nothing is lost."""
        meta: dict[str, Any] = {"exact_cost": _plain(self.exact)}
        if self.model is not None:
            meta["model"] = self.model
        if self.requested_model is not None and self.requested_model != self.model:
            meta["requested_model"] = self.requested_model
        if self.provider_cost is not None:
            meta["provider_cost"] = _plain(self.provider_cost)
        if self.minimum_applied:
            meta["minimum_applied"] = True
        return meta


def _plain(value: Decimal) -> str:
    return format(value.normalize(_CTX), "f")


def ceil_credits(value: Decimal) -> int:
    """Round up to the next whole credit (amounts are whole credits)."""
    return int(value.to_integral_value(rounding=ROUND_CEILING, context=_CTX))


def resolve_model(catalog: Catalog, feature: FeatureSpec, requested: str | None) -> str | None:
    """The model to price with: the requested one if the catalog knows it, else the
    feature's default model, else None."""
    if requested is not None and requested in catalog.models:
        return requested
    if feature.default_model is not None and feature.default_model in catalog.models:
        return feature.default_model
    return None


def usage_cost(spec: ModelSpec, input_tokens: int, output_tokens: int) -> Decimal:
    """The exact (unrounded) credit cost of the given token usage under one model price."""
    weighted = _CTX.add(_CTX.multiply(Decimal(input_tokens), spec.input_weight),
                        _CTX.multiply(Decimal(output_tokens), spec.output_weight))
    margin = _CTX.add(Decimal(1), _CTX.divide(spec.profit_percent, _HUNDRED))
    return _CTX.multiply(_CTX.divide(weighted, spec.tokens_per_credit), margin)


def provider_cost(spec: ModelSpec, input_tokens: int, output_tokens: int) -> Decimal | None:
    """What the provider charges for the usage, when the catalog gives per-1k prices."""
    if spec.provider_input_per_1k is None and spec.provider_output_per_1k is None:
        return None
    total = Decimal(0)
    if spec.provider_input_per_1k is not None:
        total = _CTX.add(total, _CTX.multiply(_CTX.divide(Decimal(input_tokens), _THOUSAND),
                                              spec.provider_input_per_1k))
    if spec.provider_output_per_1k is not None:
        total = _CTX.add(total, _CTX.multiply(_CTX.divide(Decimal(output_tokens), _THOUSAND),
                                              spec.provider_output_per_1k))
    return total


def price_usage(catalog: Catalog, feature: FeatureSpec, input_tokens: int,
                output_tokens: int, model: str | None = None) -> Price:
    """The price of one use of ``feature``; 0 when both counts are 0.

    Fixed-cost features cost their catalog cost. Usage-priced features use the model's
    price (an unknown model falls back to the feature's default model) and never cost
    less than the feature's ``min_cost``; without any model price they cost ``min_cost``.
    """
    if input_tokens == 0 and output_tokens == 0:
        return Price(0, Decimal(0), requested_model=model)
    if feature.pricing == "fixed":
        return Price(feature.cost, Decimal(feature.cost), model, model)
    chosen = resolve_model(catalog, feature, model)
    if chosen is None:
        return Price(feature.min_cost, Decimal(feature.min_cost), None, model,
                     minimum_applied=True)
    spec = catalog.models[chosen]
    exact = usage_cost(spec, input_tokens, output_tokens)
    cost = ceil_credits(exact)
    floor = cost < feature.min_cost
    return Price(max(cost, feature.min_cost), exact, chosen, model,
                 provider_cost(spec, input_tokens, output_tokens), floor)


def estimate_hold(catalog: Catalog, feature: FeatureSpec, *, max_output_tokens: int | None,
                  hold: int | None, model: str | None) -> int:
    """The credits a start sets aside.

    Fixed-cost features hold their cost. Otherwise an explicit ``hold`` wins; else
    ``max_output_tokens`` priced with the model (never below ``min_cost``); else
    ``min_cost``.
    """
    if feature.pricing == "fixed":
        return feature.cost
    if hold is not None:
        return hold
    if max_output_tokens:
        return price_usage(catalog, feature, 0, max_output_tokens, model).cost
    return feature.min_cost
