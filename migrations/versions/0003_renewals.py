"""renewal runs and grants (issue 4)

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

BigId = sa.BigInteger()
Json = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
Ts = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "renewal_runs",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("trigger", sa.String(16), nullable=False),
        sa.Column("tier", sa.String(64), nullable=True),
        sa.Column("account_limit", sa.BigInteger(), nullable=True),
        sa.Column("dry_run", sa.Boolean(), nullable=False),
        sa.Column("continue_on_error", sa.Boolean(), nullable=False),
        sa.Column("as_of", Ts, nullable=False),
        sa.Column("chunk_size", sa.Integer(), nullable=False),
        sa.Column("candidates", sa.BigInteger(), nullable=False),
        sa.Column("total_chunks", sa.Integer(), nullable=False),
        sa.Column("chunks_done", sa.Integer(), nullable=False),
        sa.Column("total_processed", sa.BigInteger(), nullable=False),
        sa.Column("successful", sa.BigInteger(), nullable=False),
        sa.Column("failed", sa.BigInteger(), nullable=False),
        sa.Column("skipped", sa.BigInteger(), nullable=False),
        sa.Column("tokens_granted", sa.BigInteger(), nullable=False),
        sa.Column("errors", Json, nullable=True),
        sa.Column("alert", sa.Boolean(), nullable=False),
        sa.Column("alert_sent_at", Ts, nullable=True),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("created_at", Ts, server_default=sa.func.now(), nullable=False),
        sa.Column("finished_at", Ts, nullable=True),
        sa.CheckConstraint("kind IN ('daily', 'monthly')", name="renewal_run_kind"),
        sa.CheckConstraint("status IN ('running', 'completed', 'stopped', 'failed')",
                           name="renewal_run_status"),
        sa.CheckConstraint("chunks_done <= total_chunks", name="renewal_run_chunks"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_renewal_runs_kind_created", "renewal_runs", ["kind", "created_at"])
    op.create_table(
        "renewal_chunks",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("run_id", BigId, nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("after_id", sa.BigInteger(), nullable=False),
        sa.Column("upto_id", sa.BigInteger(), nullable=False),
        sa.Column("planned", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("processed", sa.Integer(), nullable=False),
        sa.Column("successful", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Integer(), nullable=False),
        sa.Column("skipped", sa.Integer(), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.Column("errors", Json, nullable=True),
        sa.Column("changes", Json, nullable=True),
        sa.Column("finished_at", Ts, nullable=True),
        sa.CheckConstraint("status IN ('pending', 'done', 'skipped', 'failed')",
                           name="renewal_chunk_status"),
        sa.CheckConstraint("after_id < upto_id", name="renewal_chunk_range"),
        sa.ForeignKeyConstraint(["run_id"], ["renewal_runs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("run_id", "seq", name="uq_renewal_chunk_seq"),
    )


def downgrade() -> None:
    op.drop_table("renewal_chunks")
    op.drop_index("ix_renewal_runs_kind_created", table_name="renewal_runs")
    op.drop_table("renewal_runs")
