"""Leave room on wallet and account pages so their updates stay HOT.

Balances and renewal dates change all the time but are in no index. When a page has free
space PostgreSQL updates such rows in place (a HOT update) without touching any index;
on a full page every update moves the row and rewrites every index entry. A renewal over
freshly loaded accounts paid that on every row. PostgreSQL only.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE wallets SET (fillfactor = 70)")
    op.execute("ALTER TABLE accounts SET (fillfactor = 70)")


def downgrade() -> None:
    op.execute("ALTER TABLE wallets RESET (fillfactor)")
    op.execute("ALTER TABLE accounts RESET (fillfactor)")
