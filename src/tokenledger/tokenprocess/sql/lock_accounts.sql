-- A group of token-process starts, read 1 of 3: lock the accounts FOR UPDATE in id order
-- (as every writer does) and draw each start's hold id in the same statement; and whether
-- the account has open holds past their expiry (the start releases them first, so
-- availability never waits for the sweep; through ix_holds_account).
-- :user_ids text[], :now timestamptz
SELECT user_id, id, plan_code, timezone, last_renewal_at, nextval('holds_id_seq'),
       EXISTS (SELECT 1 FROM holds
               WHERE holds.account_id = accounts.id AND status = 'open'
                 AND expires_at <= :now)
FROM accounts
WHERE user_id = ANY(CAST(:user_ids AS text[]))
ORDER BY id
FOR UPDATE
