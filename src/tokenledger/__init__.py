"""tokenledger: token (credit) accounting for AI-powered applications."""

from tokenledger.client import Balance, LedgerClient, WalletInfo
from tokenledger.config import Settings
from tokenledger.errors import (
    AccountNotFound,
    IdempotencyConflict,
    InsufficientTokens,
    TokenLedgerError,
    ValidationFailed,
)
from tokenledger.ledger.service import EventResult
from tokenledger.tokenprocess.errors import FeatureNotAccessible
from tokenledger.tokenprocess.service import StartResult

__all__ = [
    "AccountNotFound", "Balance", "EventResult", "IdempotencyConflict", "InsufficientTokens",
    "LedgerClient", "Settings", "TokenLedgerError", "ValidationFailed", "WalletInfo",
    "FeatureNotAccessible", "StartResult",
]
