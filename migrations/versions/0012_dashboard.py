"""Read ledger entries and event outcomes by time: BRIN indexes on their ``created_at``.

The dashboard reads the last hour of outcomes (events per minute) and the last days of
entries (credits charged and provider cost per day) over every account. Both tables are
append-only, so their rows lie on disk in the order they were written: a BRIN index (a
few pages, the time range of each 128-page block) lets such a read skip every block
outside its window instead of scanning the table. Inserting costs next to nothing (a
block range is summarized once it fills up, by autovacuum), so the writers' paths are
unchanged. PostgreSQL builds each index with one scan of its table.

Revision ID: 0012
Revises: 0011
"""

from __future__ import annotations

from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

INDEXES = (("ix_entries_created_brin", "ledger_entries"),
           ("ix_outcomes_created_brin", "event_outcomes"))


def upgrade() -> None:
    for name, table in INDEXES:
        op.execute(f"CREATE INDEX {name} ON {table} USING brin (created_at)"
                   " WITH (autosummarize = on)")


def downgrade() -> None:
    for name, _ in INDEXES:
        op.execute(f"DROP INDEX {name}")
