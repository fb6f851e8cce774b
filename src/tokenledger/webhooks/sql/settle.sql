-- What a relay's attempts came to: delivered, due again at :retry_at after a failure, or
-- failed once the retry schedule is spent (a NULL retry_at). A delivery redelivered or
-- cancelled meanwhile keeps its new state.
UPDATE webhook_deliveries AS d
SET status = CASE WHEN r.ok THEN 'delivered' WHEN r.retry_at IS NULL THEN 'failed'
                  ELSE 'pending' END,
    delivered_at = CASE WHEN r.ok THEN CAST(:now AS timestamptz) END,
    next_attempt_at = coalesce(r.retry_at, d.next_attempt_at),
    last_status = r.code,
    last_error = r.error
FROM unnest(CAST(:ids AS bigint[]), CAST(:oks AS boolean[]), CAST(:codes AS integer[]),
            CAST(:errors AS text[]), CAST(:retry_at AS timestamptz[]),
            CAST(:attempts AS integer[])) AS r(id, ok, code, error, retry_at, attempts)
WHERE d.id = r.id AND d.status = 'pending' AND d.attempts = r.attempts
