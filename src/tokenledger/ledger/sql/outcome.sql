-- What happened to an event key: its stored outcome, else its newest dead letter, else
-- nothing (still pending, or never seen).
SELECT * FROM (
  SELECT 1 AS rank, outcome, reason, result, payload_hash
  FROM event_outcomes WHERE key = :key
  UNION ALL
  (SELECT 2, 'dead_lettered', reason, NULL, NULL
   FROM dead_letters WHERE key = :key ORDER BY id DESC LIMIT 1)
) AS found
ORDER BY rank
LIMIT 1
