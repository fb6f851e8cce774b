-- A dry run's chunk: what compact.sql would fold for the next :limit accounts after
-- :after, changing and locking nothing. :after, :limit, :cutoff
WITH
acc AS MATERIALIZED (
  SELECT id FROM accounts WHERE id > :after ORDER BY id LIMIT :limit
),
-- include: tokenledger.retention/fold
SELECT (SELECT max(id) FROM acc) AS upto,
       (SELECT count(*) FROM acc) AS accounts,
       (SELECT count(*) FROM fold) AS wallets,
       (SELECT CAST(coalesce(sum(n), 0) AS bigint) FROM fold) AS archived,
       (SELECT count(*) FROM fold WHERE carried <> 0) AS carried
