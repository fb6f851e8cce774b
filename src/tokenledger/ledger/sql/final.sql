-- Which of these event keys are final: applied (any stored outcome) or dead-lettered.
-- The in-flight reconciler (queue/inflight.py) clears their messages' records.
SELECT key FROM event_outcomes WHERE key = ANY(:keys)
UNION
SELECT key FROM dead_letters WHERE key = ANY(:keys)
