"""A closed account: ``accounts.closed_at``.

Closing keeps every row (the ledger stays whole and verifiable); from then on charges,
starts and ends without a hold are refused by name, while credits, refunds and the ends
of holds already placed still apply, so nothing in flight is lost.

Revision ID: 0013
Revises: 0012
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("accounts", sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("accounts", "closed_at")
