"""Price tables: model prices kept in a file of their own and merged into the catalog, so
a new model (or a provider's new price) is priced without a code or catalog change.

A price table is JSON or TOML::

    credit_value = 0.001        # currency per credit: turns provider prices into credits
    profit_percent = 20         # the margin of the models that do not give their own

    [models.claude-sonnet-4]    # from the provider's price list (per 1,000 tokens) ...
    provider_input_per_1k = 0.003
    provider_output_per_1k = 0.015

    [models.house-model]        # ... or the catalog's own fields, as in [models.X]
    input_weight = 1
    output_weight = 4
    tokens_per_credit = 1000

A model that gives ``tokens_per_credit`` is taken as written (the catalog's ``[models.X]``
fields). One that gives only provider prices is converted so that its credits cost what
the provider charges, plus the margin: ``input_weight`` 1, ``output_weight`` the ratio of
the output price to the input price, ``tokens_per_credit = credit_value × 1000 /
provider_input_per_1k`` (4 decimals). ``tokenledger catalog prices FILE`` stores the
current catalog with the table's models added or replaced as a new catalog version (a
JSON document); workers and API processes pick it up within a second.
"""

from __future__ import annotations

import json
import tomllib
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from tokenledger.catalog.models import CatalogVersion
from tokenledger.catalog.service import CatalogSpec, ModelSpec, load_catalog, parse_catalog
from tokenledger.errors import CatalogError
from tokenledger.messages import describe

Price = Annotated[Decimal, Field(ge=0)]
_PLACES = Decimal("0.0001")


class TableModel(BaseModel):
    """One model of a price table: the catalog's fields, or provider prices only."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    input_weight: Price | None = None
    output_weight: Price | None = None
    tokens_per_credit: Annotated[Decimal, Field(gt=0)] | None = None
    profit_percent: Price | None = None
    provider_input_per_1k: Price | None = None
    provider_output_per_1k: Price | None = None


class PriceTable(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    credit_value: Annotated[Decimal, Field(gt=0)] | None = None
    profit_percent: Price = Decimal(0)
    models: dict[str, TableModel]


def parse_price_table(text: str, source: str) -> dict[str, ModelSpec]:
    """The table's models as catalog model prices; CatalogError names a bad entry."""
    try:
        data = json.loads(text) if text.lstrip().startswith("{") else tomllib.loads(text)
        table = PriceTable.model_validate(data)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise CatalogError(f"{source}: not valid JSON or TOML: {exc}") from None
    except ValidationError as exc:
        raise CatalogError(f"{source}: {describe(exc)}") from None
    return {name: _model_spec(table, name, m, source) for name, m in table.models.items()}


def _model_spec(table: PriceTable, name: str, m: TableModel, source: str) -> ModelSpec:
    given = m.model_dump(exclude_none=True)
    if m.tokens_per_credit is not None:
        return ModelSpec(**{"profit_percent": table.profit_percent, **given})
    pin, pout = m.provider_input_per_1k, m.provider_output_per_1k
    if table.credit_value is None or pin is None or pout is None or not (pin or pout):
        raise CatalogError(f"{source}: models.{name}: give tokens_per_credit, or both "
                           "provider prices and the table's credit_value")
    # Weights relative to the input price (the output price when input is free).
    base = pin or pout
    return ModelSpec(
        input_weight=(pin / base).quantize(_PLACES), output_weight=(pout / base).quantize(_PLACES),
        tokens_per_credit=(table.credit_value * 1000 / base).quantize(_PLACES),
        profit_percent=table.profit_percent if m.profit_percent is None else m.profit_percent,
        provider_input_per_1k=pin, provider_output_per_1k=pout)


def with_prices(spec: CatalogSpec, models: dict[str, ModelSpec]) -> CatalogSpec:
    """The catalog with ``models`` added, or replacing the same names."""
    return CatalogSpec.model_validate({**spec.model_dump(), "models": {**spec.models, **models}})


def load_price_table(session: Session, path: Path) -> tuple[int, dict[str, ModelSpec]]:
    """Store the newest catalog with the table at ``path`` merged in, as a new version;
    returns it and the table's models. Raises CatalogError (nothing stored) for a bad
    table."""
    try:
        text = Path(path).read_text("utf-8")
    except OSError as exc:
        raise CatalogError(f"{path}: cannot read: {exc.strerror}") from None
    models = parse_price_table(text, str(path))
    row = session.execute(select(CatalogVersion.document, CatalogVersion.source)
                          .order_by(CatalogVersion.id.desc()).limit(1)).first()
    if row is None:
        raise CatalogError("no catalog loaded: run `tokenledger migrate`")
    merged = with_prices(parse_catalog(row.document, row.source), models)
    document = json.dumps(merged.model_dump(mode="json"), indent=2)
    return load_catalog(session, document, f"{row.source} + prices {path}"), models


def price_summary(models: dict[str, ModelSpec]) -> dict[str, Any]:
    """JSON-ready, for the command's answer."""
    return {name: spec.model_dump(mode="json") for name, spec in models.items()}
