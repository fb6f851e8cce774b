-- An account's wallets as of :at, answered from the ledger: every wallet that existed
-- then, with its balance after its last entry dated before :at (the balance_after chain:
-- a carry-forward stands for all it folded), whether it was live then, and what the holds
-- open then had taken from it (holds debit their wallets, so "held" is shown apart,
-- never added). Each row also carries the retention cut-off: before it the ledger holds
-- carry-forwards, not the entries. No row: no such account; one row with a NULL wallet
-- id: no wallet then.
SELECT a.plan_code, a.timezone, w.id, w.wallet_type,
       coalesce((SELECT e.balance_after FROM ledger_entries AS e
                 WHERE e.account_id = a.id AND e.wallet_id = w.id AND e.created_at < :at
                 ORDER BY e.id DESC LIMIT 1), 0) AS balance,
       w.expires_at,
       coalesce(w.is_active AND (w.expires_at IS NULL OR w.expires_at > :at), false) AS live,
       coalesce((SELECT sum(CAST(x ->> 'amount' AS bigint))
                 FROM holds AS h, jsonb_array_elements(h.allocations) AS x
                 WHERE h.account_id = a.id AND h.created_at < :at
                   AND (h.resolved_at IS NULL OR h.resolved_at >= :at)
                   AND CAST(x ->> 'wallet_id' AS bigint) = w.id), 0) AS held,
       (SELECT max(r.cutoff) FROM retention_runs AS r WHERE NOT r.dry_run) AS compacted_before
FROM accounts AS a
LEFT JOIN wallets AS w ON w.account_id = a.id AND w.created_at < :at
WHERE a.user_id = :user_id
ORDER BY w.id
