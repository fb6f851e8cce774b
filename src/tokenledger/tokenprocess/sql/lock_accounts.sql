-- A group of token-process starts, read 1 of 3: lock the accounts FOR UPDATE in id order
-- (as every writer does) and draw each start's hold id in the same statement.
-- :user_ids text[]
SELECT user_id, id, plan_code, timezone, last_renewal_at, closed_at, nextval('holds_id_seq')
FROM accounts
WHERE user_id = ANY(CAST(:user_ids AS text[]))
ORDER BY id
FOR UPDATE
