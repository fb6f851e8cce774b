"""Compare keys byte by byte: identifier columns get the "C" collation.

User ids, event and hold keys, entry types and wallet types are identifiers, never
sorted for people to read, yet every lookup and every insert into their indexes compared
them by the database's locale (strcoll on copies of both strings, for each of the ~20
comparisons of a B-tree descent). With "C" the comparison is a memcmp: inserting a
renewal slice's 2,000 entries (their unique event key index) took about a quarter less
time. The order "C" gives is Unicode code point order, the order Python compares
strings in, so keyset pagination and sorting by these columns agree between the two.

PostgreSQL rebuilds the indexes on each column and re-checks the CHECK constraints that
name one (a scan of ledger_entries, wallets and holds; the tables are not rewritten), all
in the migration's one transaction, under an exclusive lock of the seven tables until it
commits: run it when the ledger can pause (minutes per ten million entries). Each column
keeps the type it has. Statements prepared before it by running processes answer the
altered columns and fail once ("cached plan must not change result type"); the API's
start pool drops such a connection and retries the start, and SQLAlchemy connections
re-prepare after the failed transaction.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

# (table, column): the indexed identifier columns.
COLUMNS = (
    ("accounts", "user_id"),
    ("low_balance_state", "user_id"),
    ("wallets", "wallet_type"),
    ("ledger_entries", "event_key"),
    ("ledger_entries", "type"),
    ("ledger_entries", "reference"),
    ("event_outcomes", "key"),
    ("holds", "key"),
    ("holds", "status"),
    ("event_conflicts", "key"),
    ("dead_letters", "key"),
)


def _collate(collation: str) -> None:
    bind = op.get_bind()
    tables: dict[str, list[str]] = {}
    for table, column in COLUMNS:
        type_ = bind.exec_driver_sql(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute"
            f" WHERE attrelid = '{table}'::regclass AND attname = '{column}'").scalar_one()
        tables.setdefault(table, []).append(
            f'ALTER COLUMN {column} TYPE {type_} COLLATE "{collation}"')
    for table, changes in tables.items():
        op.execute(f"ALTER TABLE {table} {', '.join(changes)}")


def upgrade() -> None:
    _collate("C")


def downgrade() -> None:
    _collate("default")
