"""Every mapped table, imported in one place so Alembic and the tests see them all.

Each domain package declares its tables in its own ``models`` module.
"""

import tokenledger.apikeys.models  # noqa: F401  (api_keys)
import tokenledger.catalog.models  # noqa: F401  (plans, features, model_prices, catalog_versions)
import tokenledger.ledger.models  # noqa: F401  (accounts, wallets, ledger_entries, ...)
import tokenledger.notify.models  # noqa: F401  (low_balance_state, account_thresholds)
import tokenledger.queue.models  # noqa: F401  (dead_letters)
import tokenledger.renewals.models  # noqa: F401  (renewal_runs, renewal_chunks)
import tokenledger.retention.models  # noqa: F401  (retention_runs, archives, erasures)
import tokenledger.tokenprocess.models  # noqa: F401  (holds)
import tokenledger.webhooks.models  # noqa: F401  (webhook_endpoints, _deliveries, _timer)
from tokenledger.db.base import Base

CATALOG_TABLES = frozenset({"plans", "features", "model_prices", "catalog_versions"})


def ledger_tables() -> list[str]:
    """Tables holding ledger state (everything but the catalog), children first."""
    return [t.name for t in reversed(Base.metadata.sorted_tables)
            if t.name not in CATALOG_TABLES]


__all__ = ["Base", "CATALOG_TABLES", "ledger_tables"]
