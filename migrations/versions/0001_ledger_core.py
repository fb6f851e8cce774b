"""ledger core

Revision ID: 0001
Revises: 
Create Date: 2026-11-21 14:36:10.493698
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('catalog_versions',
    sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
    sa.Column('source', sa.Text(), nullable=False),
    sa.Column('default_plan', sa.String(length=64), nullable=False),
    sa.Column('document', sa.Text(), nullable=False),
    sa.Column('loaded_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('dead_letters',
    sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
    sa.Column('fingerprint', sa.String(length=64), nullable=False),
    sa.Column('key', sa.String(length=255), nullable=True),
    sa.Column('payload', sa.Text(), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('first_seen', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.Column('last_seen', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('fingerprint')
    )
    op.create_index(op.f('ix_dead_letters_key'), 'dead_letters', ['key'], unique=False)
    op.create_table('event_conflicts',
    sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
    sa.Column('key', sa.String(length=255), nullable=False),
    sa.Column('payload_hash', sa.String(length=64), nullable=False),
    sa.Column('payload', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('seen_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('key', 'payload_hash', name='uq_conflict_key_hash')
    )
    op.create_index(op.f('ix_event_conflicts_key'), 'event_conflicts', ['key'], unique=False)
    op.create_table('event_outcomes',
    sa.Column('key', sa.String(length=255), nullable=False),
    sa.Column('payload_hash', sa.String(length=64), nullable=False),
    sa.Column('user_id', sa.String(length=128), nullable=False),
    sa.Column('event_type', sa.String(length=32), nullable=False),
    sa.Column('outcome', sa.String(length=16), nullable=False),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('result', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.CheckConstraint("outcome IN ('applied', 'declined', 'rejected')", name='outcome_kind'),
    sa.PrimaryKeyConstraint('key')
    )
    op.create_table('features',
    sa.Column('code', sa.String(length=128), nullable=False),
    sa.Column('pricing', sa.String(length=16), nullable=False),
    sa.Column('cost', sa.BigInteger(), nullable=False),
    sa.Column('min_cost', sa.BigInteger(), nullable=False),
    sa.Column('allow_overdraft', sa.Boolean(), nullable=False),
    sa.Column('default_model', sa.String(length=128), nullable=True),
    sa.Column('description', sa.Text(), nullable=True),
    sa.CheckConstraint("pricing IN ('fixed', 'usage')", name='feature_pricing'),
    sa.CheckConstraint('cost >= 0 AND min_cost >= 0', name='feature_costs'),
    sa.PrimaryKeyConstraint('code')
    )
    op.create_table('model_prices',
    sa.Column('model', sa.String(length=128), nullable=False),
    sa.Column('input_weight', sa.Numeric(precision=12, scale=4), nullable=False),
    sa.Column('output_weight', sa.Numeric(precision=12, scale=4), nullable=False),
    sa.Column('tokens_per_credit', sa.Numeric(precision=14, scale=4), nullable=False),
    sa.Column('profit_percent', sa.Numeric(precision=8, scale=3), nullable=False),
    sa.Column('provider_input_per_1k', sa.Numeric(precision=14, scale=8), nullable=True),
    sa.Column('provider_output_per_1k', sa.Numeric(precision=14, scale=8), nullable=True),
    sa.CheckConstraint('tokens_per_credit > 0', name='price_tpc'),
    sa.PrimaryKeyConstraint('model')
    )
    op.create_table('plans',
    sa.Column('code', sa.String(length=64), nullable=False),
    sa.Column('allocation', sa.BigInteger(), nullable=False),
    sa.Column('opening_tokens', sa.BigInteger(), nullable=False),
    sa.Column('period', sa.String(length=16), nullable=False),
    sa.Column('renewal_mode', sa.String(length=16), nullable=False),
    sa.Column('rollover_cap', sa.BigInteger(), nullable=True),
    sa.Column('low_balance_threshold', sa.BigInteger(), nullable=True),
    sa.Column('features', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.CheckConstraint("period IN ('daily', '30d')", name='plan_period'),
    sa.CheckConstraint("renewal_mode IN ('reset', 'topup')", name='plan_mode'),
    sa.CheckConstraint('allocation >= 0 AND opening_tokens >= 0', name='plan_amounts'),
    sa.PrimaryKeyConstraint('code')
    )
    op.create_table('accounts',
    sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
    sa.Column('user_id', sa.String(length=128), nullable=False),
    sa.Column('plan_code', sa.String(length=64), nullable=False),
    sa.Column('timezone', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.Column('last_renewal_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_reset_on', sa.String(length=10), nullable=True),
    sa.ForeignKeyConstraint(['plan_code'], ['plans.code'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('user_id')
    )
    op.create_table('wallets',
    sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
    sa.Column('account_id', sa.BigInteger(), nullable=False),
    sa.Column('wallet_type', sa.String(length=32), nullable=False),
    sa.Column('balance', sa.BigInteger(), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('is_active', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.CheckConstraint("wallet_type <> 'STANDARD' OR expires_at IS NULL", name='standard_never_expires'),
    sa.CheckConstraint("wallet_type = 'STANDARD' OR balance >= 0", name='wallet_non_negative'),
    sa.ForeignKeyConstraint(['account_id'], ['accounts.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('account_id', 'id', name='uq_wallet_account_id')
    )
    op.create_index('uq_wallet_expiry', 'wallets', ['account_id', 'wallet_type', 'expires_at'], unique=True, postgresql_where=sa.text('expires_at IS NOT NULL'))
    op.create_index('uq_wallet_no_expiry', 'wallets', ['account_id', 'wallet_type'], unique=True, postgresql_where=sa.text('expires_at IS NULL'))
    op.create_table('ledger_entries',
    sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
    sa.Column('account_id', sa.BigInteger(), nullable=False),
    sa.Column('wallet_id', sa.BigInteger(), nullable=False),
    sa.Column('amount', sa.BigInteger(), nullable=False),
    sa.Column('balance_before', sa.BigInteger(), nullable=False),
    sa.Column('balance_after', sa.BigInteger(), nullable=False),
    sa.Column('type', sa.String(length=16), nullable=False),
    sa.Column('feature', sa.String(length=128), nullable=True),
    sa.Column('event_key', sa.String(length=255), nullable=True),
    sa.Column('reference', sa.String(length=255), nullable=True),
    sa.Column('metadata', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.CheckConstraint("type IN ('CHARGE', 'REFUND', 'CREDIT', 'OPEN', 'DAILY_RESET', 'RENEWAL', 'EXPIRY', 'HOLD', 'HOLD_RELEASE', 'ADJUSTMENT')", name='entry_type'),
    sa.CheckConstraint('amount <> 0', name='entry_non_zero'),
    sa.CheckConstraint('balance_after = balance_before + amount', name='entry_arithmetic'),
    sa.ForeignKeyConstraint(['account_id', 'wallet_id'], ['wallets.account_id', 'wallets.id'], name='fk_entry_wallet_of_account'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('event_key', 'wallet_id', 'type', name='uq_entry_event_wallet_type')
    )
    op.create_index('ix_entries_account_id', 'ledger_entries', ['account_id', 'id'], unique=False)
    op.create_index('ix_entries_reference', 'ledger_entries', ['reference'], unique=False, postgresql_where=sa.text('reference IS NOT NULL'))


def downgrade() -> None:
    op.drop_index('ix_entries_reference', table_name='ledger_entries')
    op.drop_index('ix_entries_account_id', table_name='ledger_entries')
    op.drop_table('ledger_entries')
    op.drop_index('uq_wallet_no_expiry', table_name='wallets', postgresql_where=sa.text('expires_at IS NULL'))
    op.drop_index('uq_wallet_expiry', table_name='wallets', postgresql_where=sa.text('expires_at IS NOT NULL'))
    op.drop_table('wallets')
    op.drop_table('accounts')
    op.drop_table('plans')
    op.drop_table('model_prices')
    op.drop_table('features')
    op.drop_table('event_outcomes')
    op.drop_index(op.f('ix_event_conflicts_key'), table_name='event_conflicts')
    op.drop_table('event_conflicts')
    op.drop_index(op.f('ix_dead_letters_key'), table_name='dead_letters')
    op.drop_table('dead_letters')
    op.drop_table('catalog_versions')
