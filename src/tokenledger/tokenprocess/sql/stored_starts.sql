-- Read 3 of 3: the stored outcomes of the starts' hold keys (a retried start answers
-- its first result).
-- :keys text[]
SELECT key, payload_hash, result FROM event_outcomes WHERE key = ANY(CAST(:keys AS text[]))
