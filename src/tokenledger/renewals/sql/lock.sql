-- A renewal slice, statement 1 of 2: lock its due accounts FOR UPDATE in id order (every
-- writer locks accounts in id order, so a renewal and live batches never deadlock).
SELECT count(*) FROM (
  SELECT a.id FROM
-- include: tokenledger.renewals/due
  ORDER BY a.id FOR UPDATE OF a
) AS locked
