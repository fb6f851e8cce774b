-- What happened to an event key: its stored outcome (with the payload hash and the
-- message that first applied it), else its newest dead letter, else nothing (pending, or
-- never seen).
SELECT * FROM (
  SELECT 1 AS rank, outcome, reason, result, payload_hash, message_id
  FROM event_outcomes WHERE key = :key
  UNION ALL
  (SELECT 2, 'dead_lettered', reason, NULL, NULL, NULL
   FROM dead_letters WHERE key = :key ORDER BY id DESC LIMIT 1)
) AS found
ORDER BY rank
LIMIT 1
