"""Wallet state in memory for one batch, and the order charges draw from wallets."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from tokenledger.catalog.service import Catalog
from tokenledger.ledger.models import STANDARD
from tokenledger.timeutil import next_local_midnight

_NEVER = datetime(9999, 12, 31, tzinfo=UTC)


@dataclass(slots=True)
class WalletState:
    id: int
    account_id: int
    wallet_type: str
    balance: int
    expires_at: datetime | None
    is_active: bool
    created_at: datetime
    start_balance: int = 0

    def live(self, now: datetime) -> bool:
        return self.is_active and (self.expires_at is None or self.expires_at > now)

    @property
    def dirty(self) -> bool:
        return self.balance != self.start_balance


@dataclass(slots=True)
class AccountState:
    id: int
    user_id: str
    plan_code: str
    timezone: str
    last_renewal_at: datetime | None
    wallets: list[WalletState] = field(default_factory=list)
    closed_at: datetime | None = None
    changed: bool = False

    def live_wallets(self, now: datetime) -> list[WalletState]:
        return [w for w in self.wallets if w.live(now)]

    def balance(self, now: datetime) -> int:
        """Sum of live wallets (a STANDARD overdraft counts against it)."""
        return sum(w.balance for w in self.wallets if w.live(now))

    def available(self, now: datetime) -> int:
        """What a charge may draw without overdraft: positive balances of live wallets."""
        return sum(max(w.balance, 0) for w in self.wallets if w.live(now))

    def standard(self) -> WalletState | None:
        return next((w for w in self.wallets if w.wallet_type == STANDARD), None)

    def find(self, wallet_type: str, expires_at: datetime | None) -> WalletState | None:
        return next((w for w in self.wallets
                     if w.wallet_type == wallet_type and w.expires_at == expires_at), None)


def effective_expiry(wallet: WalletState, account: AccountState, catalog: Catalog,
                     now: datetime) -> datetime:
    """When a wallet's credits stop being usable: its expiry, or the STANDARD wallet's reset.

    A daily plan's STANDARD wallet is set back to its allocation at local midnight, so
    whatever is left in it is lost then; drawing it first saves the user's other credits.
    """
    if wallet.expires_at is not None:
        return wallet.expires_at
    if wallet.wallet_type == STANDARD:
        plan = catalog.plans.get(account.plan_code)
        if plan is not None and plan.renewal_mode == "reset":
            if plan.period == "daily":
                return next_local_midnight(now, account.timezone)
            if account.last_renewal_at is not None:
                return account.last_renewal_at + timedelta(days=30)
    return _NEVER


def draw_order(account: AccountState, catalog: Catalog, now: datetime,
               preferred: str | None) -> list[WalletState]:
    """Live wallets in the order a charge takes from them.

    The caller's preferred type first, then the soonest effective expiry, then the oldest.
    """
    return sorted(
        account.live_wallets(now),
        key=lambda w: (0 if preferred and w.wallet_type == preferred else 1,
                       effective_expiry(w, account, catalog, now), w.created_at, w.id),
    )


def allocate(order: list[WalletState], cost: int) -> tuple[list[tuple[WalletState, int]], int]:
    """The draw rule: take ``cost`` from the wallets in ``order``, each giving at most its
    positive balance. Returns (wallet, taken) in order, and what is still owed (more than
    the wallets hold: the caller refuses it, or takes it from STANDARD as an overdraft)."""
    taken: list[tuple[WalletState, int]] = []
    remaining = cost
    for wallet in order:
        if remaining == 0:
            break
        take = min(remaining, max(wallet.balance, 0))
        if take:
            taken.append((wallet, take))
            remaining -= take
    return taken, remaining
