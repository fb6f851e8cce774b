"""holds for the two-phase token process (issue 3)

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "holds",
        sa.Column("id", sa.BigInteger(),
                  autoincrement=True, nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("account_id", sa.BigInteger(),
                  nullable=False),
        sa.Column("user_id", sa.String(length=128), nullable=False),
        sa.Column("feature", sa.String(length=128), nullable=False),
        sa.Column("model", sa.String(length=128), nullable=True),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("allocations",
                  sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
                  nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(),
                  nullable=False),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("resolved_by", sa.String(length=255), nullable=True),
        sa.CheckConstraint("amount >= 0", name="hold_amount"),
        sa.CheckConstraint("status IN ('open', 'settled', 'released', 'expired')",
                           name="hold_status"),
        sa.CheckConstraint("(status = 'open' AND resolved_at IS NULL)"
                           " OR (status <> 'open' AND resolved_at IS NOT NULL)",
                           name="hold_resolution"),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key"),
    )
    op.create_index("ix_holds_account", "holds", ["account_id", "status"], unique=False)
    op.create_index("ix_holds_open_expiry", "holds", ["expires_at"], unique=False,
                    postgresql_where=sa.text("status = 'open'"))


def downgrade() -> None:
    op.drop_index("ix_holds_open_expiry", table_name="holds",
                  postgresql_where=sa.text("status = 'open'"))
    op.drop_index("ix_holds_account", table_name="holds")
    op.drop_table("holds")
