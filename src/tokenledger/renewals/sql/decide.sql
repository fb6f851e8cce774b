-- The grant rule, written once: a run's decision for each due account of a slice, as the
-- CTEs "p" (the plans), "cand" (each due account with its STANDARD wallet, or why it
-- cannot be granted), "s" (the first failing account), "g" (the grants: each account's
-- period, its STANDARD balance before and after) and "errs" (the failures, as JSON).
-- Included by grant.sql and dry_run.sql.
--
-- reset: the STANDARD wallet is set to the allocation. topup: the allocation is added,
-- never beyond the rollover cap and never taking anything away. daily: the period is the
-- account's local date. monthly: the new period starts a whole number of 30-day periods
-- after the old one (seconds, not calendar days: DST-proof), so renewals do not drift
-- later with each run and an account missed for months is caught up once.
-- With :stop (stop at the first error) nothing at or after the first failing account is
-- granted.
p(code, allocation, mode, cap, low, meta) AS (
  SELECT v.*, jsonb_build_object('run', CAST(:run AS bigint), 'plan', v.code)
  FROM unnest(CAST(:codes AS text[]), CAST(:allocs AS bigint[]), CAST(:modes AS text[]),
              CAST(:caps AS bigint[]), CAST(:lows AS bigint[]))
    AS v(code, allocation, mode, cap, low)
),
cand AS (
  -- The wallets are read here, after statement 1 holds the locks: under READ COMMITTED
  -- this snapshot has every charge that committed while we waited.
  SELECT a.id AS account_id, a.user_id, a.plan_code,
         CASE WHEN :kind = 'daily' THEN a.day END AS mark_day,
         CASE WHEN :kind = 'monthly'
              THEN coalesce(a.last_renewal_at, a.created_at)
                   + CAST(floor((extract(epoch FROM CAST(:as_of AS timestamptz))
                                 - extract(epoch FROM coalesce(a.last_renewal_at, a.created_at)))
                                / 2592000) AS bigint) * interval '2592000 seconds'
         END AS mark_at,
         w.id AS wallet_id, w.balance AS before, w.live,
         p.allocation, p.mode, p.cap, p.low,
         CASE WHEN :kind = 'daily' AND a.day IS NULL
                THEN 'unknown timezone ' || quote_literal(a.timezone)
              WHEN w.id IS NULL THEN 'account has no STANDARD wallet'
              WHEN NOT w.is_active THEN 'STANDARD wallet is inactive'
         END AS error
  FROM (SELECT a.id, a.user_id, a.plan_code, a.timezone, a.last_renewal_at, a.created_at,
               z.day
        FROM
-- include: tokenledger.renewals/due
       ) AS a
  JOIN p ON p.code = a.plan_code
  -- One pass over the range's wallets: each account's STANDARD wallet, and the sum of its
  -- live wallets (for its balance_changed notice).
  LEFT JOIN (
    SELECT x.account_id,
           max(x.id) FILTER (WHERE x.wallet_type = 'STANDARD' AND x.expires_at IS NULL) AS id,
           max(x.balance) FILTER (WHERE x.wallet_type = 'STANDARD' AND x.expires_at IS NULL)
             AS balance,
           bool_or(x.is_active) FILTER (WHERE x.wallet_type = 'STANDARD'
                                        AND x.expires_at IS NULL) AS is_active,
           CAST(coalesce(sum(x.balance) FILTER (WHERE x.is_active AND (x.expires_at IS NULL
                                                OR x.expires_at > now())), 0) AS bigint) AS live
    FROM wallets AS x
    WHERE x.account_id > :after AND x.account_id <= :upto
    GROUP BY x.account_id
  ) AS w ON w.account_id = a.id
),
s AS (
  SELECT min(account_id) AS first FROM cand WHERE error IS NOT NULL
),
g AS (
  SELECT cand.account_id, cand.user_id, cand.plan_code, cand.wallet_id, cand.mark_day,
         cand.mark_at, cand.low, cand.live,
         coalesce(cand.mark_day, to_char(cand.mark_at AT TIME ZONE 'UTC', 'YYYY-MM-DD'))
           AS period,
         cand.before,
         CASE WHEN cand.mode = 'reset' THEN cand.allocation
              WHEN cand.cap IS NULL THEN cand.before + cand.allocation
              ELSE least(cand.before + cand.allocation, greatest(cand.cap, cand.before))
         END AS after
  FROM cand, s
  WHERE cand.error IS NULL AND (NOT :stop OR s.first IS NULL OR cand.account_id < s.first)
),
errs AS (
  SELECT coalesce(json_agg(json_build_object('user_id', cand.user_id,
                                             'account_id', cand.account_id,
                                             'error', cand.error)
                           ORDER BY cand.account_id), '[]') AS errors
  FROM cand, s
  WHERE cand.error IS NOT NULL AND (NOT :stop OR cand.account_id = s.first)
)
