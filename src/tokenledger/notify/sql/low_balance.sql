-- The low-balance rule, written once and included by every statement that changes
-- balances (a batch of events, the token-process start, a renewal slice).
--
-- It follows a CTE "c(user_id, balance, seq, threshold)" holding each account the
-- statement changed: its balance after the change, the id of its newest entry and its
-- plan's low-balance threshold (NULL: none). An account at or below its threshold is
-- marked low; the insert that succeeds is the crossing (its user_id is returned by "low",
-- and balance_low is published for it). An account above its threshold, or without one,
-- is re-armed. The host statement provides :now.
low AS (
  INSERT INTO low_balance_state (user_id, threshold, balance, ledger_seq, since)
  SELECT c.user_id, c.threshold, c.balance, c.seq, :now FROM c
  WHERE c.balance <= c.threshold
  ON CONFLICT DO NOTHING
  RETURNING user_id
),
rearm AS (
  DELETE FROM low_balance_state AS l USING c
  WHERE l.user_id = c.user_id AND (c.threshold IS NULL OR c.balance > c.threshold)
)
