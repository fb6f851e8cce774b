"""Schema migrations (Alembic) and the first catalog load, as one idempotent step."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config


def script_location() -> Path:
    """Alembic's scripts: inside the installed package, or the repository's migrations/."""
    package = Path(__file__).resolve().parents[1]
    installed = package / "migrations"
    return installed if (installed / "env.py").exists() else package.parents[1] / "migrations"


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(script_location()))
    cfg.attributes["url"] = url
    return cfg


def migrate(url: str, catalog_path: Path | None = None) -> int | None:
    """Bring the schema to head and load the catalog if none is stored. Safe to run twice.
    Returns the catalog version loaded, or None when one was stored already."""
    from tokenledger.catalog.service import ensure_catalog
    from tokenledger.db.engine import session_factory

    command.upgrade(alembic_config(url), "head")
    with session_factory(url).begin() as session:
        return ensure_catalog(session, catalog_path)


def current_revision(url: str) -> str | None:
    """The schema revision the database is at (None: never migrated)."""
    from sqlalchemy import text

    from tokenledger.db.engine import get_engine

    with get_engine(url).connect() as conn:
        exists = conn.execute(text("SELECT to_regclass('alembic_version')")).scalar()
        if exists is None:
            return None
        return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


def head_revision() -> str:
    """The newest revision this release's migrations know."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("")).get_current_head() or ""
