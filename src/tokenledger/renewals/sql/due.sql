-- The due rule, written once: a FROM ... WHERE fragment over "accounts AS a" selecting the
-- accounts a run of :kind judges due at its instant, among the plans :codes, with ids in
-- (:after, :upto]. Included by the chunk statements, the run planner, due counts and
-- eligibility.
--
-- daily: an account is due once its own local date ("z.day": :zones/:days hold every
-- IANA zone's date at the run's instant, at most three distinct dates) is past its last
-- reset. An account whose zone is unknown is due too, so it fails loudly instead of
-- never resetting. monthly: due when its last renewal (or opening) is at least 30 days
-- old (:cut is the run's instant minus 30 days).
accounts AS a
LEFT JOIN unnest(CAST(:zones AS text[]), CAST(:days AS text[])) AS z(tz, day)
  ON z.tz = a.timezone
WHERE a.id > :after AND a.id <= :upto
  AND a.plan_code = ANY(CAST(:codes AS text[]))
  AND CASE WHEN :kind = 'daily'
           THEN z.day IS NULL OR a.last_reset_on IS NULL OR a.last_reset_on < z.day
           ELSE coalesce(a.last_renewal_at, a.created_at) <= CAST(:cut AS timestamptz)
      END
