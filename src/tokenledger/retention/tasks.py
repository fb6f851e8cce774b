"""Retention's task: the scheduled compaction (beat, when TOKENLEDGER_RETENTION_ENABLED)."""
