-- The one write of a group of token-process starts (on distinct accounts), followed by
-- the commit: the holds ("h", one row per start, as one JSON document), one HOLD entry
-- per wallet drawn ("d", with the balances before, in draw order), the wallets' new
-- balances, the outcome rows (a retried start finds its answer there) and the low-balance
-- state. The draws travel as integer arrays: PostgreSQL plans an array of unknown length
-- as ten rows (an index scan of wallets), a JSON recordset as a hundred (a scan of the
-- whole table). Answers one row per account with entries (its id and newest entry id:
-- the change's ledger_seq), one per low-balance crossing (NULL, its threshold, its
-- user_id) and, when webhook deliveries were written, (NULL, how many, NULL).
-- :holds json, :draw_accounts/:draw_wallets/:draw_taken/:draw_before bigint[],
-- :now timestamptz, :event text
WITH h AS (
  SELECT * FROM json_to_recordset(CAST(:holds AS json)) AS h(
    id bigint, key text, account_id bigint, user_id text, feature text, model text,
    amount bigint, allocations jsonb, expires_at timestamptz, meta jsonb, digest text,
    result jsonb, balance bigint, threshold bigint)
),
d AS (
  SELECT * FROM unnest(CAST(:draw_accounts AS bigint[]), CAST(:draw_wallets AS bigint[]),
                       CAST(:draw_taken AS bigint[]), CAST(:draw_before AS bigint[]))
    WITH ORDINALITY AS d(account_id, wallet_id, taken, before, n)
),
hold AS (
  INSERT INTO holds (id, key, account_id, user_id, feature, model, amount, allocations,
                     status, expires_at, created_at)
  SELECT id, key, account_id, user_id, feature, model, amount, allocations, 'open',
         expires_at, :now
  FROM h
),
entries AS (
  INSERT INTO ledger_entries (account_id, wallet_id, amount, balance_before, balance_after,
                              type, feature, event_key, metadata, created_at)
  SELECT d.account_id, d.wallet_id, -d.taken, d.before, d.before - d.taken, 'HOLD',
         h.feature, h.key, h.meta, :now
  FROM d JOIN h USING (account_id) ORDER BY d.n
  RETURNING id, account_id
),
balances AS (
  UPDATE wallets SET balance = d.before - d.taken FROM d WHERE wallets.id = d.wallet_id
),
outcome AS (
  INSERT INTO event_outcomes (key, payload_hash, user_id, event_type, outcome, result,
                              created_at)
  SELECT key, digest, user_id, :event, 'applied', result, :now FROM h
),
seq AS (
  SELECT account_id, max(id) AS seq FROM entries GROUP BY account_id
),
c AS (
  SELECT h.user_id, h.balance, seq.seq, h.threshold FROM h JOIN seq USING (account_id)
),
-- include: tokenledger.notify/low_balance
SELECT account_id, seq, CAST(NULL AS text) FROM seq
UNION ALL
SELECT NULL, threshold, user_id FROM low
UNION ALL
SELECT NULL, count(*), NULL FROM hooks HAVING count(*) > 0
