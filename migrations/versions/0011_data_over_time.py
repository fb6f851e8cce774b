"""Data over time (issue 19): carry-forward entries, the archive and retention runs, the
erasure log, per-account low-balance thresholds, webhook endpoints and their outbox.

- ``ledger_entries.type`` admits ``CARRY_FORWARD`` (the CHECK is replaced: one scan of
  ledger_entries under its exclusive lock, which a wider list cannot fail).
- ``low_balance_state``'s foreign key to ``accounts.user_id`` follows an erasure's new
  user id (ON UPDATE CASCADE), as ``account_thresholds``' does.
- New tables only otherwise; identifier columns compared with the ledger's use the "C"
  collation, as migration 0009 gave the others.

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

BigId = sa.BigInteger()
Json = postgresql.JSONB(astext_type=sa.Text())
Ts = sa.DateTime(timezone=True)

OLD_TYPES = ("CHARGE", "REFUND", "CREDIT", "OPEN", "DAILY_RESET", "RENEWAL", "EXPIRY", "HOLD",
             "HOLD_RELEASE", "ADJUSTMENT")
NEW_TYPES = (*OLD_TYPES, "CARRY_FORWARD")
WEBHOOK_EVENTS = ("balance_low", "balance_recovered", "balance_changed", "hold_expired",
                  "renewal_run_finished", "renewal_failure_alert", "dead_letter_added")


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def _entry_types(values: tuple[str, ...]) -> None:
    op.execute("ALTER TABLE ledger_entries DROP CONSTRAINT entry_type,"
               f" ADD CONSTRAINT entry_type CHECK ({_in('type', values)})")


def _low_balance_fk(on_update: str) -> None:
    name = op.get_bind().exec_driver_sql(
        "SELECT conname FROM pg_constraint WHERE conrelid = 'low_balance_state'::regclass"
        " AND contype = 'f'").scalar_one()
    op.execute(f"ALTER TABLE low_balance_state DROP CONSTRAINT {name},"
               f" ADD CONSTRAINT {name} FOREIGN KEY (user_id) REFERENCES accounts (user_id)"
               f" ON DELETE CASCADE{on_update}")


def upgrade() -> None:
    _entry_types(NEW_TYPES)
    _low_balance_fk(" ON UPDATE CASCADE")
    op.create_table(
        "account_thresholds",
        sa.Column("user_id", sa.String(128, collation="C"), nullable=False),
        sa.Column("threshold", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", Ts, server_default=sa.func.now(), nullable=False),
        sa.CheckConstraint("threshold >= 0", name="account_threshold_range"),
        sa.ForeignKeyConstraint(["user_id"], ["accounts.user_id"], ondelete="CASCADE",
                                onupdate="CASCADE"),
        sa.PrimaryKeyConstraint("user_id"),
    )

    op.create_table(
        "retention_runs",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("cutoff", Ts, nullable=False),
        sa.Column("key_cutoff", Ts, nullable=False),
        sa.Column("dry_run", sa.Boolean(), nullable=False),
        sa.Column("trigger", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        *(sa.Column(name, sa.BigInteger(), nullable=False) for name in (
            "accounts", "wallets", "entries_archived", "carry_forwards", "outcomes_archived",
            "deliveries_deleted")),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("created_at", Ts, server_default=sa.func.now(), nullable=False),
        sa.Column("finished_at", Ts, nullable=True),
        sa.CheckConstraint("status IN ('running', 'completed', 'failed')",
                           name="retention_run_status"),
        sa.CheckConstraint("key_cutoff <= cutoff", name="retention_run_key_cutoff"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "ledger_entries_archive",
        sa.Column("entry_id", BigId, nullable=False),
        sa.Column("run_id", BigId, nullable=False),
        sa.Column("account_id", BigId, nullable=False),
        sa.Column("wallet_id", BigId, nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("balance_before", sa.BigInteger(), nullable=False),
        sa.Column("balance_after", sa.BigInteger(), nullable=False),
        sa.Column("type", sa.String(16, collation="C"), nullable=False),
        sa.Column("feature", sa.String(128), nullable=True),
        sa.Column("event_key", sa.String(255, collation="C"), nullable=True),
        sa.Column("reference", sa.String(255, collation="C"), nullable=True),
        sa.Column("metadata", Json, nullable=True),
        sa.Column("created_at", Ts, nullable=False),
        sa.Column("carried_into", BigId, nullable=True),
        sa.Column("archived_at", Ts, server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("entry_id", "run_id"),
    )
    op.create_index("ix_entries_archive_account", "ledger_entries_archive", ["account_id"])
    op.create_index("ix_entries_archive_carried", "ledger_entries_archive", ["carried_into"])
    op.create_table(
        "event_outcomes_archive",
        sa.Column("key", sa.String(255, collation="C"), nullable=False),
        sa.Column("run_id", BigId, nullable=False),
        sa.Column("payload_hash", sa.String(64), nullable=False),
        sa.Column("user_id", sa.String(128, collation="C"), nullable=False),
        sa.Column("event_type", sa.String(32), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("result", Json, nullable=True),
        sa.Column("created_at", Ts, nullable=False),
        sa.Column("archived_at", Ts, server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("key", "run_id"),
    )
    op.create_index("ix_outcomes_archive_user", "event_outcomes_archive", ["user_id"])
    op.create_table(
        "erasures",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("pseudonym", sa.String(128, collation="C"), nullable=False),
        sa.Column("erased_at", Ts, nullable=False),
        sa.Column("erased_by", sa.String(255), nullable=False),
        sa.Column("rows", Json, nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("pseudonym"),
    )

    types = ", ".join(f"'{t}'" for t in WEBHOOK_EVENTS)
    op.create_table(
        "webhook_endpoints",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("event_types", postgresql.ARRAY(sa.String(32)), nullable=False),
        sa.Column("secret", sa.String(128), nullable=False),
        sa.Column("description", sa.String(255), nullable=True),
        sa.Column("implicit", sa.Boolean(), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("created_at", Ts, server_default=sa.func.now(), nullable=False),
        sa.Column("removed_at", Ts, nullable=True),
        sa.CheckConstraint(f"cardinality(event_types) > 0 AND event_types <@ ARRAY[{types}]"
                           "::varchar[]", name="webhook_endpoint_event_types"),
        sa.CheckConstraint("active OR removed_at IS NOT NULL", name="webhook_endpoint_removed"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("uq_webhook_endpoint_implicit", "webhook_endpoints", ["url"], unique=True,
                    postgresql_where=sa.text("implicit AND active"))
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("webhook_id", sa.String(64, collation="C"), nullable=False),
        sa.Column("endpoint_id", BigId, nullable=False),
        sa.Column("event_type", sa.String(32), nullable=False),
        sa.Column("subject", sa.String(255, collation="C"), nullable=True),
        sa.Column("payload", Json, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", Ts, nullable=False),
        sa.Column("last_attempt_at", Ts, nullable=True),
        sa.Column("last_status", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", Ts, server_default=sa.func.now(), nullable=False),
        sa.Column("delivered_at", Ts, nullable=True),
        sa.CheckConstraint("status IN ('pending', 'delivered', 'failed', 'cancelled')",
                           name="webhook_delivery_status"),
        sa.CheckConstraint(_in("event_type", WEBHOOK_EVENTS), name="webhook_delivery_type"),
        sa.ForeignKeyConstraint(["endpoint_id"], ["webhook_endpoints.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("webhook_id"),
    )
    op.create_index("ix_webhook_deliveries_due", "webhook_deliveries", ["next_attempt_at"],
                    postgresql_where=sa.text("status = 'pending'"))
    op.create_index("ix_webhook_deliveries_subject", "webhook_deliveries", ["subject"])
    op.create_index("ix_webhook_deliveries_endpoint", "webhook_deliveries",
                    ["endpoint_id", "id"])
    op.create_index("ix_webhook_deliveries_created", "webhook_deliveries", ["created_at"])
    op.create_table(
        "webhook_timer",
        sa.Column("id", sa.SmallInteger(), nullable=False),
        sa.Column("wake_at", Ts, nullable=True),
        sa.CheckConstraint("id = 1", name="webhook_timer_one_row"),
        sa.PrimaryKeyConstraint("id"),
    )


def downgrade() -> None:
    # Fails while carry-forwards exist: their folded entries are in the archive.
    _entry_types(OLD_TYPES)
    for table in ("webhook_timer", "webhook_deliveries", "webhook_endpoints", "erasures",
                  "event_outcomes_archive", "ledger_entries_archive", "retention_runs",
                  "account_thresholds"):
        op.drop_table(table)
    _low_balance_fk("")
