-- A renewal slice, statement 2 of 2: decide every grant of the slice (decide.sql) and
-- write it, on the server, with no row travelling to Python.
--
-- The entry's unique (event_key, wallet_id, type) is the once-per-period record: its key
-- is "<prefix>:<account id>:<period>". Each new entry's id is drawn in "t", so that the
-- writes and the notices all read that one CTE: a join of two CTEs (an insert's RETURNING
-- with the grants) is planned on a guess of a few rows each, and was sometimes a nested
-- loop over both. With :skip_granted (the redo after a unique violation: an account's
-- period mark was set back by hand) periods granted before are skipped, at the cost of an
-- index probe per row.
-- Answers the counts, each granted account's user, balance, entry id (its ledger_seq) and
-- threshold (its own, else its plan's), the low-balance crossings, the webhook deliveries
-- written, and the errors.
WITH
-- include: tokenledger.renewals/decide
,
t AS (
  SELECT g.*, CAST(:prefix AS text) || ':' || g.account_id || ':' || g.period AS key,
         (:skip_granted AND EXISTS (
            SELECT FROM ledger_entries AS e
            WHERE e.event_key = CAST(:prefix AS text) || ':' || g.account_id || ':' || g.period
              AND e.wallet_id = g.wallet_id AND e.type = :type)) AS granted
  FROM g
),
u AS (
  SELECT t.*, CASE WHEN t.after <> t.before AND NOT t.granted
                   THEN nextval('ledger_entries_id_seq') END AS entry_id
  FROM t ORDER BY t.account_id  -- ids in account order (drawn after the sort)
),
ins AS (
  INSERT INTO ledger_entries (id, account_id, wallet_id, amount, balance_before,
                              balance_after, type, event_key, metadata, created_at)
  -- The plan's metadata joins here, not in "cand": carried through the materialized
  -- CTEs it cost the database a few microseconds per account.
  SELECT u.entry_id, u.account_id, u.wallet_id, u.after - u.before, u.before, u.after,
         :type, u.key, p.meta, :now
  FROM u JOIN p ON p.code = u.plan_code
  WHERE u.entry_id IS NOT NULL
  ORDER BY u.account_id
  RETURNING amount
),
w AS (
  UPDATE wallets SET balance = u.after FROM u
  WHERE wallets.id = u.wallet_id AND u.entry_id IS NOT NULL
  RETURNING 1
),
m AS (
  UPDATE accounts SET last_reset_on = coalesce(u.mark_day, accounts.last_reset_on),
                      last_renewal_at = coalesce(u.mark_at, accounts.last_renewal_at)
  FROM u WHERE accounts.id = u.account_id
  RETURNING 1
),
-- Each granted account's balance: its live wallets as this statement's snapshot sees
-- them (it cannot see its own wallet update) plus the grant.
c AS MATERIALIZED (
  SELECT u.user_id, u.live + u.after - u.before AS balance, u.entry_id AS seq,
         u.low AS threshold
  FROM u WHERE u.entry_id IS NOT NULL
),
-- include: tokenledger.notify/low_balance
SELECT (SELECT count(*) FROM u) AS grants,
       (SELECT count(*) FROM u WHERE granted AND after <> before) AS already,
       (SELECT coalesce(sum(amount), 0) FROM ins) AS tokens,
       (SELECT count(*) FROM ins) AS inserted,
       (SELECT count(*) FROM w) AS wallets,
       (SELECT count(*) FROM m) AS marked,
       cc.users, cc.balances, cc.seqs, cc.thresholds,
       (SELECT array_agg(user_id) FROM low) AS crossed,
       (SELECT count(*) FROM hooks) AS hooks,
       (SELECT errors FROM errs) AS errors
FROM (SELECT array_agg(user_id) AS users, array_agg(balance) AS balances,
             array_agg(seq) AS seqs, array_agg(threshold) AS thresholds FROM lb) AS cc
