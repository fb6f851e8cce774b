-- The low-balance rule, written once and included by every statement that changes
-- balances (a batch of events, the token-process start, a renewal slice).
--
-- It follows a CTE "c(user_id, balance, seq, threshold)" holding each account the
-- statement changed: its balance after the change, the id of its newest entry and its
-- plan's low-balance threshold (NULL: none). An account's own threshold
-- (account_thresholds) overrides its plan's ("lb" has the one that applies). An account
-- at or below its threshold is marked low; the insert that succeeds is the crossing
-- ("low": balance_low). An account above its threshold, or without one, is re-armed;
-- the delete that succeeds is the recovery ("rearm": balance_recovered). Every change,
-- crossing and recovery goes to the webhook outbox ("hooks", webhooks/sql/fan_out.sql).
-- The host provides :now.
lb AS MATERIALIZED (
  SELECT c.user_id, c.balance, c.seq, coalesce(o.threshold, c.threshold) AS threshold
  FROM c LEFT JOIN account_thresholds AS o ON o.user_id = c.user_id
),
low AS (
  INSERT INTO low_balance_state (user_id, threshold, balance, ledger_seq, since)
  SELECT lb.user_id, lb.threshold, lb.balance, lb.seq, :now FROM lb
  WHERE lb.balance <= lb.threshold
  ON CONFLICT DO NOTHING
  RETURNING user_id, threshold, balance, ledger_seq
),
rearm AS (
  DELETE FROM low_balance_state AS l USING lb
  WHERE l.user_id = lb.user_id AND (lb.threshold IS NULL OR lb.balance > lb.threshold)
  RETURNING lb.user_id, l.threshold, lb.balance, lb.seq AS ledger_seq
),
-- Each kind is built only when an active endpoint subscribes to it (a one-time check:
-- without webhooks, a renewal slice builds nothing).
subscribed AS MATERIALIZED (
  SELECT DISTINCT CAST(t AS text) AS type
  FROM webhook_endpoints AS ep, unnest(ep.event_types) AS t WHERE ep.active
),
webhook_events (type, subject, data, dedupe) AS (
  SELECT 'balance_changed', user_id,
         jsonb_build_object('user_id', user_id, 'balance', balance, 'ledger_seq', seq),
         'balance_changed:' || seq
  FROM lb WHERE EXISTS (SELECT FROM subscribed WHERE type = 'balance_changed')
  UNION ALL
  SELECT 'balance_low', user_id,
         jsonb_build_object('user_id', user_id, 'balance', balance, 'ledger_seq', ledger_seq,
                            'threshold', threshold),
         'balance_low:' || ledger_seq
  FROM low WHERE EXISTS (SELECT FROM subscribed WHERE type = 'balance_low')
  UNION ALL
  SELECT 'balance_recovered', user_id,
         jsonb_build_object('user_id', user_id, 'balance', balance, 'ledger_seq', ledger_seq,
                            'threshold', threshold),
         'balance_recovered:' || ledger_seq
  FROM rearm WHERE EXISTS (SELECT FROM subscribed WHERE type = 'balance_recovered')
),
-- include: tokenledger.webhooks/fan_out
