"""Server API keys: stored hashed, compared in constant time, scoped and revocable."""

from tokenledger.apikeys.models import SCOPES, ApiKey
from tokenledger.apikeys.service import (
    CreatedKey,
    KeyCache,
    KeyInfo,
    authenticate,
    create_key,
    list_keys,
    revoke_key,
)

__all__ = ["SCOPES", "ApiKey", "CreatedKey", "KeyCache", "KeyInfo", "authenticate",
           "create_key", "list_keys", "revoke_key"]
