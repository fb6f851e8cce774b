-- An account's plan, timezone and wallets, oldest first; "live" is false once a wallet
-- expired (or was deactivated). No row: no such account. One row with a NULL wallet id:
-- an account without wallets.
SELECT a.plan_code, a.timezone, w.id, w.wallet_type, w.balance, w.expires_at,
       coalesce(w.is_active AND (w.expires_at IS NULL OR w.expires_at > :now), false) AS live
FROM accounts AS a
LEFT JOIN wallets AS w ON w.account_id = a.id
WHERE a.user_id = :user_id
ORDER BY w.id
