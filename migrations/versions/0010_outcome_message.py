"""Remember which message first applied each key: the caller that published it reads
``applied``, any other publish of the same key reads a replay of it.

A nullable column: no rewrite, no lock beyond a moment. Outcomes stored before this
release have no message id; their readers cannot tell a replay apart and say so.

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute('ALTER TABLE event_outcomes ADD COLUMN message_id varchar(64) COLLATE "C"')


def downgrade() -> None:
    op.execute("ALTER TABLE event_outcomes DROP COLUMN message_id")
