-- The webhook outbox, written once: every event of the host's CTE
-- "webhook_events(type, subject, data, dedupe)", for every active endpoint subscribed to
-- its type, in the host statement (so in the transaction of the change it announces).
-- The Standard Webhooks message id comes from the endpoint and the event's dedupe key:
-- the same event recorded twice is one delivery, due at once (by the database's clock).
-- "hooks" answers a row per delivery written. The host provides :now, the event's time.
hooks AS (
  INSERT INTO webhook_deliveries (webhook_id, endpoint_id, event_type, subject, payload,
                                  status, attempts, next_attempt_at, created_at)
  SELECT 'msg_' || md5(ep.id || ':' || ev.dedupe), ep.id, ev.type, ev.subject,
         jsonb_build_object('type', ev.type,
                            'timestamp', to_char(CAST(:now AS timestamptz) AT TIME ZONE 'UTC',
                                                 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
                            'data', ev.data),
         'pending', 0, now(), :now
  FROM webhook_events AS ev
  JOIN webhook_endpoints AS ep ON ep.active AND ev.type = ANY (ep.event_types)
  ON CONFLICT (webhook_id) DO NOTHING
  RETURNING 1
)
