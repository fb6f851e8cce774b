-- Erase one account (locked by the caller) in its large tables: the account takes the
-- pseudonym (its low-balance state and threshold follow by ON UPDATE CASCADE), and so do
-- its outcomes, holds and balance webhooks, live or archived; tokenledger's own key for
-- opening it ("open:<user>") is renamed with it. Amounts, balances, keys and dates stay,
-- so verify and the reports still add up.
--
-- Entry metadata keeps only the facts tokenledger itself records, each checked to be
-- what it writes (numbers, the catalog's plan and model codes, hold resolutions,
-- timestamps); whatever a producer wrote (free text) goes. Carry-forwards hold nothing
-- else. An outcome's result loses its free-text reason.
-- :aid, :user_id, :pseudonym, :plans text[], :models text[]
WITH
meta AS (
  SELECT src, id, run_id, (
    SELECT jsonb_object_agg(k, v) FROM jsonb_each(m.metadata) AS f(k, v)
    WHERE (k IN ('input_tokens', 'output_tokens', 'exact_cost', 'provider_cost', 'hold_id',
                 'shortfall', 'max_output_tokens', 'run')
           AND (jsonb_typeof(v) = 'number'
                OR (jsonb_typeof(v) = 'string' AND v #>> '{}' ~ '^-?[0-9]+(\.[0-9]+)?$')))
       OR (k = 'minimum_applied' AND jsonb_typeof(v) = 'boolean')
       OR (k = 'plan' AND v #>> '{}' = ANY (CAST(:plans AS text[])))
       OR (k IN ('model', 'requested_model') AND v #>> '{}' = ANY (CAST(:models AS text[])))
       OR (k = 'resolution' AND v #>> '{}' IN ('settled', 'released', 'expired'))
       OR (k = 'expires_at'
           AND v #>> '{}' ~ '^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9.:]+(Z|[+-][0-9]{2}:[0-9]{2})?$')
  ) AS kept
  FROM (SELECT 'live' AS src, id, CAST(NULL AS bigint) AS run_id, metadata
        FROM ledger_entries
        WHERE account_id = :aid AND metadata IS NOT NULL AND type <> 'CARRY_FORWARD'
        UNION ALL
        SELECT 'archive', entry_id, run_id, metadata FROM ledger_entries_archive
        WHERE account_id = :aid AND metadata IS NOT NULL AND type <> 'CARRY_FORWARD') AS m
),
account AS (
  UPDATE accounts SET user_id = :pseudonym WHERE id = :aid RETURNING id
),
entries AS (
  UPDATE ledger_entries AS e
  SET metadata = meta.kept,
      event_key = CASE WHEN e.event_key = 'open:' || :user_id THEN 'open:' || :pseudonym
                       ELSE e.event_key END
  FROM meta WHERE meta.src = 'live' AND e.id = meta.id
  RETURNING 1
),
opened AS (
  UPDATE ledger_entries SET event_key = 'open:' || :pseudonym
  WHERE account_id = :aid AND event_key = 'open:' || :user_id AND metadata IS NULL
  RETURNING 1
),
archived AS (
  UPDATE ledger_entries_archive AS e
  SET metadata = meta.kept,
      event_key = CASE WHEN e.event_key = 'open:' || :user_id THEN 'open:' || :pseudonym
                       ELSE e.event_key END
  FROM meta
  WHERE meta.src = 'archive' AND e.entry_id = meta.id AND e.run_id = meta.run_id
  RETURNING 1
),
outcomes AS (
  UPDATE event_outcomes
  SET user_id = :pseudonym,
      key = CASE WHEN key = 'open:' || :user_id THEN 'open:' || :pseudonym ELSE key END,
      result = CASE WHEN result ? 'user_id'
                    THEN jsonb_set(result - 'reason', '{user_id}', to_jsonb(CAST(:pseudonym AS text)))
                    ELSE result - 'reason' END
  WHERE user_id = :user_id
  RETURNING 1
),
outcomes_archived AS (
  UPDATE event_outcomes_archive
  SET user_id = :pseudonym,
      key = CASE WHEN key = 'open:' || :user_id THEN 'open:' || :pseudonym ELSE key END,
      result = CASE WHEN result ? 'user_id'
                    THEN jsonb_set(result - 'reason', '{user_id}', to_jsonb(CAST(:pseudonym AS text)))
                    ELSE result - 'reason' END
  WHERE user_id = :user_id
  RETURNING 1
),
holds AS (
  UPDATE holds SET user_id = :pseudonym WHERE account_id = :aid RETURNING 1
),
deliveries AS (
  UPDATE webhook_deliveries
  SET subject = :pseudonym,
      payload = jsonb_set(payload, '{data,user_id}', to_jsonb(CAST(:pseudonym AS text)))
  WHERE subject = :user_id
  RETURNING 1
)
SELECT (SELECT count(*) FROM account) AS accounts,
       (SELECT count(*) FROM entries) + (SELECT count(*) FROM opened) AS entries,
       (SELECT count(*) FROM archived) AS archived_entries,
       (SELECT count(*) FROM outcomes) AS outcomes,
       (SELECT count(*) FROM outcomes_archived) AS archived_outcomes,
       (SELECT count(*) FROM holds) AS holds,
       (SELECT count(*) FROM deliveries) AS webhook_deliveries
