"""Check "an entry's wallet belongs to its account" once per statement, not once per row.

The composite foreign key ran one lookup-and-lock query per inserted entry: on a renewal
slice that was about a third of the statement (2,000 entries, 2,000 queries each locking a
wallet row FOR KEY SHARE). A statement-level trigger over the statement's new rows checks
them all with one anti-join. The lock the foreign key took kept a wallet from being
deleted or moved to another account meanwhile; wallets are never deleted or moved (they
are deactivated), and a row trigger on wallets now refuses both, so the check cannot be
raced.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_CHECK_ENTRIES = """
CREATE FUNCTION tokenledger_entries_wallet_check() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    bad record;
BEGIN
    SELECT n.id, n.account_id, n.wallet_id INTO bad FROM new_entries AS n
     WHERE NOT EXISTS (SELECT FROM wallets AS w
                        WHERE w.id = n.wallet_id AND w.account_id = n.account_id)
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'ledger entry % names wallet %, which is not a wallet of account %',
            bad.id, bad.wallet_id, bad.account_id
            USING ERRCODE = 'foreign_key_violation',
                  CONSTRAINT = 'fk_entry_wallet_of_account', TABLE = 'ledger_entries';
    END IF;
    RETURN NULL;
END $$
"""

_KEEP_WALLETS = """
CREATE FUNCTION tokenledger_wallets_stay() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'wallet % cannot be deleted: the ledger refers to it (deactivate it)',
            OLD.id USING ERRCODE = 'restrict_violation', TABLE = 'wallets';
    END IF;
    RAISE EXCEPTION 'wallet % cannot move to another account or id', OLD.id
        USING ERRCODE = 'restrict_violation', TABLE = 'wallets';
END $$
"""


def upgrade() -> None:
    op.execute(_CHECK_ENTRIES)
    op.execute(_KEEP_WALLETS)
    op.execute("ALTER TABLE ledger_entries DROP CONSTRAINT fk_entry_wallet_of_account")
    op.execute("CREATE TRIGGER entries_wallet_check AFTER INSERT ON ledger_entries"
               " REFERENCING NEW TABLE AS new_entries FOR EACH STATEMENT"
               " EXECUTE FUNCTION tokenledger_entries_wallet_check()")
    op.execute("CREATE TRIGGER wallets_stay BEFORE DELETE ON wallets FOR EACH ROW"
               " EXECUTE FUNCTION tokenledger_wallets_stay()")
    op.execute("CREATE TRIGGER wallets_stay_put BEFORE UPDATE OF id, account_id ON wallets"
               " FOR EACH ROW WHEN (OLD.id IS DISTINCT FROM NEW.id"
               " OR OLD.account_id IS DISTINCT FROM NEW.account_id)"
               " EXECUTE FUNCTION tokenledger_wallets_stay()")


def downgrade() -> None:
    op.execute("DROP TRIGGER wallets_stay_put ON wallets")
    op.execute("DROP TRIGGER wallets_stay ON wallets")
    op.execute("DROP TRIGGER entries_wallet_check ON ledger_entries")
    op.execute("ALTER TABLE ledger_entries ADD CONSTRAINT fk_entry_wallet_of_account"
               " FOREIGN KEY (account_id, wallet_id) REFERENCES wallets (account_id, id)")
    op.execute("DROP FUNCTION tokenledger_wallets_stay()")
    op.execute("DROP FUNCTION tokenledger_entries_wallet_check()")
