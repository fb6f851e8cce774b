-- What a compaction folds, written once: for the accounts of the host's CTE "acc(id)",
-- each wallet's entries dated before :cutoff, up to the first one that is not (a prefix in
-- id order, so the balance_before/balance_after chain stays whole however commits
-- interleaved), as "old"; and per wallet ("fold"): the last of them (it becomes the
-- CARRY_FORWARD, keeping its id and date), how many, their dates, and their sum (its
-- balance_after). A wallet whose only old entry is already a carry-forward has nothing
-- to fold. Included by compact.sql (accounts claimed) and plan.sql (a dry run).
ordered AS MATERIALIZED (
  SELECT e.id, e.wallet_id, e.type, e.balance_after, e.created_at,
         bool_or(e.created_at >= :cutoff) OVER (PARTITION BY e.wallet_id ORDER BY e.id) AS newer
  FROM ledger_entries AS e
  WHERE e.account_id IN (SELECT id FROM acc)
),
old AS MATERIALIZED (
  SELECT id, wallet_id, type, balance_after, created_at FROM ordered WHERE NOT newer
),
fold AS MATERIALIZED (
  SELECT w.wallet_id, w.last, w.n, w.since, w.until, o.balance_after AS carried
  FROM (SELECT wallet_id, max(id) AS last, count(*) AS n, min(created_at) AS since,
               max(created_at) AS until, bool_and(type = 'CARRY_FORWARD') AS folded
        FROM old GROUP BY wallet_id) AS w
  JOIN old AS o ON o.id = w.last
  WHERE NOT (w.n = 1 AND w.folded)
)
