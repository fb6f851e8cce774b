"""The ledger: accounts, wallets and entries (``models``), the batch of writes every
writer uses (``batch``), the event rules (``service``), reads (``reports``) and the
invariants (``verify``)."""
