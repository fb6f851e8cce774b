"""The Python SDK: ``LedgerClient`` (``client``) and its token-process helper (``process``)."""
