"""tokenledger: token (credit) accounting for AI-powered applications.

``from tokenledger import LedgerClient`` is all an application needs. Names are imported
on first use, so ``import tokenledger`` (and ``tokenledger --help``) stays fast.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "LedgerClient": "tokenledger.sdk.client",
    "AsyncLedgerClient": "tokenledger.sdk.aio",
    "Balance": "tokenledger.results",
    "WalletInfo": "tokenledger.results",
    "Settings": "tokenledger.config",
    "EventResult": "tokenledger.results",
    "StartResult": "tokenledger.results",
    "TokenLedgerError": "tokenledger.errors",
    "ValidationFailed": "tokenledger.errors",
    "AccountNotFound": "tokenledger.errors",
    "InsufficientTokens": "tokenledger.errors",
    "Conflict": "tokenledger.errors",
    "IdempotencyConflict": "tokenledger.errors",
    "FeatureNotAccessible": "tokenledger.errors",
    "BalanceReached": "tokenledger.errors",
    "ExtendResult": "tokenledger.results",
    "ResultTimeout": "tokenledger.errors",
    "NotFound": "tokenledger.errors",
    "ConfigurationError": "tokenledger.errors",
    "ServiceUnavailable": "tokenledger.errors",
    "DatabaseUnavailable": "tokenledger.errors",
    "BrokerUnavailable": "tokenledger.errors",
    "NotMigrated": "tokenledger.errors",
}

__all__ = [
    "AccountNotFound", "AsyncLedgerClient", "Balance", "BalanceReached", "BrokerUnavailable",
    "ConfigurationError", "Conflict", "DatabaseUnavailable", "EventResult", "ExtendResult",
    "FeatureNotAccessible", "IdempotencyConflict", "InsufficientTokens", "LedgerClient",
    "NotFound", "NotMigrated", "ResultTimeout", "ServiceUnavailable", "Settings", "StartResult",
    "TokenLedgerError", "ValidationFailed", "WalletInfo",
]

if TYPE_CHECKING:
    from tokenledger.config import Settings
    from tokenledger.errors import (
        AccountNotFound,
        BalanceReached,
        BrokerUnavailable,
        ConfigurationError,
        Conflict,
        DatabaseUnavailable,
        FeatureNotAccessible,
        IdempotencyConflict,
        InsufficientTokens,
        NotFound,
        NotMigrated,
        ResultTimeout,
        ServiceUnavailable,
        TokenLedgerError,
        ValidationFailed,
    )
    from tokenledger.results import Balance, EventResult, ExtendResult, StartResult, WalletInfo
    from tokenledger.sdk.aio import AsyncLedgerClient
    from tokenledger.sdk.client import LedgerClient


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tokenledger' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value
