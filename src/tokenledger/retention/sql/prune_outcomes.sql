-- Idempotency outcomes past their grace, one stretch of keys at a time: of the :limit
-- keys after :after (key order, the primary key's), those stored before :key_cutoff whose
-- key has no entry left in the ledger move to the archive. A redelivery of such a key is
-- no longer recognized: :key_cutoff is the bound. Answers the last key looked at and how
-- many moved. :after, :limit, :key_cutoff, :run, :now
WITH
scanned AS MATERIALIZED (
  SELECT key, created_at FROM event_outcomes WHERE key > :after ORDER BY key LIMIT :limit
),
gone AS (
  DELETE FROM event_outcomes AS o USING scanned AS s
  WHERE o.key = s.key AND s.created_at < :key_cutoff
    AND NOT EXISTS (SELECT FROM ledger_entries AS e WHERE e.event_key = s.key)
  RETURNING o.*
),
archived AS (
  INSERT INTO event_outcomes_archive (key, run_id, payload_hash, user_id, event_type,
                                      outcome, reason, result, created_at, archived_at)
  SELECT key, :run, payload_hash, user_id, event_type, outcome, reason, result, created_at,
         :now
  FROM gone
  RETURNING 1
)
SELECT (SELECT max(key) FROM scanned) AS upto,
       (SELECT count(*) FROM scanned) AS scanned,
       (SELECT count(*) FROM archived) AS archived
