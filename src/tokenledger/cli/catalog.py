"""``catalog``: the plans, features and model prices (show, load)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tokenledger.cli.base import JsonOpt, app, console, fail, print_json, settings

catalog_app = typer.Typer(no_args_is_help=True, help="Plans, features and model prices.")
app.add_typer(catalog_app, name="catalog")


@catalog_app.command("show")
def catalog_show(json_: JsonOpt = False) -> None:
    """The stored catalog: plans, features and model prices."""
    from tokenledger.db.uow import unit_of_work

    with unit_of_work(settings()) as uow:
        cat = uow.catalog
    if json_:
        print_json({"version": cat.version, "default_plan": cat.default_plan,
                    "plans": {k: v.model_dump() for k, v in cat.plans.items()},
                    "features": {k: v.model_dump() for k, v in cat.features.items()},
                    "models": {k: v.model_dump(mode="json") for k, v in cat.models.items()},
                    "wallet_types": list(cat.wallet_types)})
        return
    from rich.table import Table

    plans = Table(title=f"plans (catalog version {cat.version}, default {cat.default_plan})")
    for col in ("plan", "allocation", "opening", "period", "mode", "rollover cap", "features"):
        plans.add_column(col)
    for code, p in cat.plans.items():
        plans.add_row(code, str(p.allocation), str(p.opening_tokens), p.period,
                      p.renewal_mode, str(p.rollover_cap or "-"), ", ".join(p.features))
    features = Table(title="features")
    for col in ("feature", "pricing", "cost", "min", "overdraft", "model"):
        features.add_column(col)
    for code, f in cat.features.items():
        features.add_row(code, f.pricing, str(f.cost), str(f.min_cost),
                         "yes" if f.allow_overdraft else "no", f.default_model or "-")
    models = Table(title="model prices")
    for col in ("model", "in w", "out w", "tokens/credit", "profit %", "$/1k in", "$/1k out"):
        models.add_column(col)
    for code, m in cat.models.items():
        models.add_row(code, str(m.input_weight), str(m.output_weight),
                       str(m.tokens_per_credit), str(m.profit_percent),
                       str(m.provider_input_per_1k or "-"), str(m.provider_output_per_1k or "-"))
    console().print(plans, features, models)


@catalog_app.command("load")
def catalog_load(
    file: Annotated[Path, typer.Argument(help="A catalog TOML file.")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate only.")] = False,
) -> None:
    """Validate a catalog file and make it the catalog; a bad file changes nothing."""
    from tokenledger.catalog.service import (
        catalog_changes,
        current_catalog,
        load_catalog,
        parse_catalog,
        read_catalog_source,
    )
    from tokenledger.db.uow import unit_of_work
    from tokenledger.errors import CatalogError

    try:
        text, source = read_catalog_source(file)
        spec = parse_catalog(text, source)
        with unit_of_work(settings()) as uow:
            try:
                old = current_catalog(uow.session)
            except CatalogError:
                old = None
            changes = catalog_changes(old, spec)
            version = None if dry_run else load_catalog(uow.session, text, source)
    except CatalogError as exc:
        fail(f"catalog refused, the current one stays: {exc}")
    for section, diff in changes.items():
        parts = [f"{label} {', '.join(names)}" for label, names in diff.items() if names]
        console().print(f"  {section}: " + ("; ".join(parts) if parts else "unchanged"),
                        highlight=False)
    if version is None:
        console().print(f"[green]valid[/green]: {source} (dry run, nothing stored)")
    else:
        console().print(f"[green]catalog version {version} loaded[/green] from {source}; "
                        "workers switch to it on their next batch", highlight=False)


@catalog_app.command("prices")
def catalog_prices(
    file: Annotated[Path, typer.Argument(help="A price table, JSON or TOML.")],
    json_: JsonOpt = False,
) -> None:
    """Add or replace model prices from a price table (a new catalog version)."""
    from tokenledger.catalog.prices import load_price_table, price_summary
    from tokenledger.db.uow import unit_of_work
    from tokenledger.errors import CatalogError

    try:
        with unit_of_work(settings()) as uow:
            version, models = load_price_table(uow.session, file)
    except CatalogError as exc:
        fail(f"price table refused, the catalog stays: {exc}")
    if json_:
        print_json({"version": version, "models": price_summary(models)})
        return
    console().print(f"catalog version {version}: {len(models)} model price(s) from {file}: "
                    + ", ".join(sorted(models)), highlight=False)
