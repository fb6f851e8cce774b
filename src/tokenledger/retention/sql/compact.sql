-- A compaction chunk, statement 2 of 2 (after lock.sql claimed accounts (:after, :upto]):
-- each wallet's old entries (fold.sql) are copied to the archive as they were and folded
-- into one CARRY_FORWARD entry: the last of them, rewritten in place to carry their sum
-- from 0, so the wallet still equals the sum of its entries and each entry still
-- continues the one before. The others are deleted; so are all of them when they sum to
-- 0 (no carry-forward). Only entries dated before :cutoff are touched: a live writer
-- appends newer ones and updates wallets, which this leaves alone. Answers the counts.
-- :after, :upto, :cutoff, :run, :now
WITH
acc AS MATERIALIZED (
  SELECT id FROM accounts WHERE id > :after AND id <= :upto
),
-- include: tokenledger.retention/fold
,
archived AS (
  INSERT INTO ledger_entries_archive (entry_id, run_id, account_id, wallet_id, amount,
                                      balance_before, balance_after, type, feature,
                                      event_key, reference, metadata, created_at,
                                      carried_into, archived_at)
  SELECT e.id, :run, e.account_id, e.wallet_id, e.amount, e.balance_before,
         e.balance_after, e.type, e.feature, e.event_key, e.reference, e.metadata,
         e.created_at, CASE WHEN fold.carried <> 0 THEN fold.last END, :now
  FROM old JOIN fold USING (wallet_id) JOIN ledger_entries AS e ON e.id = old.id
  RETURNING 1
),
removed AS (
  DELETE FROM ledger_entries AS e USING old JOIN fold USING (wallet_id)
  WHERE e.id = old.id AND (old.id <> fold.last OR fold.carried = 0)
  RETURNING 1
),
carried AS (
  UPDATE ledger_entries AS e
  SET type = 'CARRY_FORWARD', amount = fold.carried, balance_before = 0, feature = NULL,
      event_key = NULL, reference = NULL,
      metadata = jsonb_build_object('run', CAST(:run AS bigint), 'entries', fold.n,
                                    'since', fold.since, 'until', fold.until)
  FROM fold
  WHERE e.id = fold.last AND fold.carried <> 0
  RETURNING 1
)
SELECT (SELECT count(*) FROM fold) AS wallets,
       (SELECT count(*) FROM archived) AS archived,
       (SELECT count(*) FROM removed) AS removed,
       (SELECT count(*) FROM carried) AS carried
