-- Arm the relay's timer for the next pending delivery, at most at :latest: answers the
-- wake time when this call armed it; nothing when nothing is pending, or when a wake no
-- later than it is already armed and still ahead (another run will wake then).
WITH soon AS (
  SELECT min(next_attempt_at) AS at FROM webhook_deliveries WHERE status = 'pending'
)
INSERT INTO webhook_timer AS t (id, wake_at)
SELECT 1, least(soon.at, CAST(:latest AS timestamptz)) FROM soon WHERE soon.at IS NOT NULL
ON CONFLICT (id) DO UPDATE SET wake_at = excluded.wake_at
WHERE t.wake_at IS NULL OR t.wake_at <= :now OR t.wake_at > excluded.wake_at
RETURNING wake_at
