-- Webhook deliveries that ended (delivered, failed, cancelled) before :cutoff, :limit at a
-- time, are deleted: notifications, not the ledger. Answers how many.
WITH gone AS (
  DELETE FROM webhook_deliveries
  WHERE id IN (SELECT id FROM webhook_deliveries
               WHERE created_at < :cutoff AND status <> 'pending'
               ORDER BY created_at LIMIT :limit)
  RETURNING 1
)
SELECT count(*) FROM gone
