"""Every Celery task name tokenledger publishes or consumes: part of the public contract.

Producers in any language publish by these names (JSON, Celery protocol 2); they never
change once released.
"""

APPLY_EVENTS = "tokenledger.apply_events"
RENEW_BATCH = "tokenledger.renew_batch"
RENEW_CHUNK = "tokenledger.renew_chunk"
EXPIRE_WALLETS = "tokenledger.expire_wallets"
RELEASE_EXPIRED_HOLDS = "tokenledger.release_expired_holds"
CHECK_BACKLOG = "tokenledger.check_backlog"
DELIVER_WEBHOOKS = "tokenledger.deliver_webhooks"
COMPACT_LEDGER = "tokenledger.compact_ledger"

ALL = (APPLY_EVENTS, RENEW_BATCH, RENEW_CHUNK, EXPIRE_WALLETS, RELEASE_EXPIRED_HOLDS,
       CHECK_BACKLOG, DELIVER_WEBHOOKS, COMPACT_LEDGER)
