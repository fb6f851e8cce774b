-- A dry run's slice: the same decision as a real run (decide.sql), writing nothing;
-- reports what would change and which periods were granted before.
WITH
-- include: tokenledger.renewals/decide
,
d AS (
  SELECT g.*, CAST(:prefix AS text) || ':' || g.account_id || ':' || g.period AS key,
         EXISTS (SELECT 1 FROM ledger_entries AS e
                 WHERE e.event_key = CAST(:prefix AS text) || ':' || g.account_id || ':'
                                     || g.period
                   AND e.wallet_id = g.wallet_id AND e.type = :type) AS granted
  FROM g
)
SELECT (SELECT count(*) FROM g) AS grants,
       (SELECT count(*) FROM d WHERE granted AND after <> before) AS already,
       (SELECT coalesce(sum(after - before), 0) FROM d WHERE NOT granted) AS tokens,
       (SELECT coalesce(json_agg(json_build_object(
                 'user_id', user_id, 'account_id', account_id, 'plan', plan_code,
                 'period', period, 'key', key, 'wallet_id', wallet_id,
                 'balance_before', before, 'balance_after', after, 'amount', after - before)
               ORDER BY account_id), '[]')
        FROM d WHERE NOT granted AND after <> before) AS changes,
       (SELECT errors FROM errs) AS errors
