-- A compaction chunk, statement 1 of 2: the next :limit accounts after :after, each
-- claimed with a transaction-level advisory lock in id order (erase.py takes the same one
-- for its account). Live writers never take it, so they never wait for a compaction;
-- two compactions, or a compaction and an erasure, of one account take turns. Taken in a
-- statement of its own so that statement 2 reads what committed while this one waited.
-- Answers the last account claimed and how many. :after, :limit, :space
SELECT max(id) AS upto, count(*) AS accounts
FROM (SELECT id, pg_advisory_xact_lock(CAST(:space AS integer),
                                       CAST(id % 2147483647 AS integer)) AS locked
      FROM (SELECT id FROM accounts WHERE id > :after ORDER BY id LIMIT :limit) AS a) AS l
