-- Read 2 of 3: lock and read the accounts' wallets. Found by user_id, not by the ids read
-- 1 answers, so all three reads can be sent at once; the server runs them one after the
-- other and this one takes its snapshot after the account locks were granted, so a start
-- that waited for another writer sees that writer's committed wallets.
-- :user_ids text[]
SELECT account_id, id, wallet_type, balance, expires_at, is_active, created_at
FROM wallets
WHERE account_id IN (SELECT id FROM accounts WHERE user_id = ANY(CAST(:user_ids AS text[])))
ORDER BY id
FOR UPDATE
