"""Features say how an end without reported usage settles (``on_incomplete``).

A provider that reports no usage (a dropped stream, a call that errored after the user
got output) leaves the end without counts; the feature's rule decides: ``charge_hold``
charges what was held, ``release`` gives it back. A column with a default: no rewrite.

Revision ID: 0014
Revises: 0013
"""

from __future__ import annotations

from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE features ADD COLUMN on_incomplete varchar(16) NOT NULL"
               " DEFAULT 'charge_hold'"
               " CONSTRAINT feature_on_incomplete"
               " CHECK (on_incomplete IN ('charge_hold', 'release'))")


def downgrade() -> None:
    op.execute("ALTER TABLE features DROP COLUMN on_incomplete")
