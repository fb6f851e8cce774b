"""Schema migrations (Alembic) and the first catalog load, as one idempotent step."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

import migrations
from tokenledger.catalog import ensure_catalog
from tokenledger.db import unit_of_work


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(migrations.__file__).parent))
    cfg.attributes["url"] = url
    return cfg


def migrate(url: str, catalog_path: Path | None = None) -> int | None:
    """Bring the schema to head and load the catalog if none is stored. Safe to run twice."""
    command.upgrade(alembic_config(url), "head")
    with unit_of_work(url) as session:
        return ensure_catalog(session, catalog_path)
