-- Claim up to :limit due deliveries, the longest due first, skipping rows another relay
-- is claiming: each counts an attempt and is leased until :lease_until, so the deliveries
-- of a relay that dies while sending are due again then (receivers deduplicate by
-- webhook id). Answers what sending needs.
WITH due AS (
  SELECT d.id FROM webhook_deliveries AS d
  WHERE d.status = 'pending' AND d.next_attempt_at <= :now
  ORDER BY d.next_attempt_at, d.id
  LIMIT :limit
  FOR UPDATE SKIP LOCKED
)
UPDATE webhook_deliveries AS d
SET attempts = d.attempts + 1, last_attempt_at = :now, next_attempt_at = :lease_until
FROM due, webhook_endpoints AS ep
WHERE d.id = due.id AND ep.id = d.endpoint_id
RETURNING d.id, d.webhook_id, d.event_type, d.attempts, d.payload, ep.url, ep.secret
