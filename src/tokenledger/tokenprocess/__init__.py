"""The two-phase token process: a hold at start, the real cost at end, holds that expire.

``models`` holds the schema, ``service`` the rules; import them directly (this package
stays empty so the ledger can import the models without a cycle).
"""
