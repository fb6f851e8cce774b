"""How long each page takes the server on an account with 100,000 ledger entries.

The account's entries span 90 days (about 34,000 in each full month), beside 1,000 small
accounts, dead letters, conflicts and a renewal run. Each page is rendered seven times
through the real server; the figure is what the server reports (its Server-Timing: from
the request reaching the dashboard to the rendered page, database reads included). The
figures are printed (``pytest -s``) and written to ``build/render-times.json``.
"""

from __future__ import annotations

import json
import statistics
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import text

from tests.api.support import api_server, auth, keys
from tests.dashboard.support import seed_large_account, server_ms, user_path
from tests.support import ROOT, apply, assert_verified, session_scope
from tokenledger import Settings
from tokenledger.db.uow import unit_of_work
from tokenledger.queue import deadletters
from tokenledger.renewals import runs as runner
from tokenledger.renewals.service import RunOptions
from tokenledger.timeutil import utcnow

# Builds 100,000 entries first (about 15 s): in the second tier (-m slow), with the crash tests.
pytestmark = [pytest.mark.services, pytest.mark.slow]
__all__ = ["api_server", "keys"]  # fixtures used by name
USER = "perf-user"
ENTRIES = 100_000
RENDERS = 7
BUDGET_MS = 100
# Aggregates over a month of this account (about 34,000 entries) or over every account's
# last 30 days: measured, but over the budget (docs/performance.md says why and what
# would bring them under it); held to a looser bound against regressions.
HEAVY = ("ops: usage, every account, 30 days", "ops: usage + monthly report, this month",
         "ops: usage + monthly report, a full month")
HEAVY_BUDGET_MS = 800

_SMALL_ACCOUNTS = text("""
WITH a AS (
    INSERT INTO accounts (user_id, plan_code, timezone)
    SELECT 'user-' || lpad(g::text, 5, '0'), 'Free', 'UTC' FROM generate_series(1, :n) AS g
    RETURNING id
)
INSERT INTO wallets (account_id, wallet_type, balance, is_active)
SELECT id, 'STANDARD', 0, true FROM a
""")


def arrange(settings: Settings) -> None:
    with session_scope(settings) as session:
        session.execute(_SMALL_ACCOUNTS, {"n": 1000})
        for n in range(30):
            deadletters.record(session, {"type": "charge", "v": 1, "key": f"dl-{n}",
                                         "user_id": f"ghost-{n}", "amount": 1},
                               "account not found", utcnow(), key=f"dl-{n}")
    seed_large_account(settings, USER, ENTRIES, days=90)
    for n in range(30):
        apply(settings, {"type": "charge", "key": f"{USER}:{2 * n + 2}", "user_id": USER,
                         "amount": 1 + n})  # keys of the seeded entries: conflicts
    run_id, chunks = runner.start_run(settings, RunOptions(kind="monthly", dry_run=True))
    runner.execute_inline(settings, chunks)


def test_pages_render_within_100_ms_on_100k_entries_but_month_long_aggregates(
        api_server: object, keys: dict, settings: Settings, db: Settings) -> None:
    arrange(settings)
    assert_verified(settings)
    with unit_of_work(settings) as uow:
        oldest = uow.session.execute(text(
            "SELECT min(e.id) FROM ledger_entries e JOIN accounts a ON a.id = e.account_id"
            " WHERE a.user_id = :u"), {"u": USER}).scalar_one()
        run_id = uow.session.execute(text("SELECT max(id) FROM renewal_runs")).scalar_one()
    user = user_path(settings, USER)
    today = utcnow().date()
    last_month = (today.replace(day=1) - timedelta(days=1)).strftime("%Y-%m")
    pages = {
        "user: overview": (user, None),
        "user: history, first page": (user + "/history", None),
        "user: history, 2,000th page (keyset)": (f"{user}/history?before={oldest + 100}",
                                                 None),
        "user: history, one type (none of it: every entry read)": (
            user + "/history?type=EXPIRY", None),
        "user: history, one local day": (
            f"{user}/history?from={today - timedelta(days=30)}&to={today - timedelta(days=30)}",
            None),
        "user: balance.json (the badge)": (user + "/balance.json", None),
        "ops: accounts (search)": ("/dashboard/ops/accounts?q=user-00", "admin"),
        "ops: account, first page": (f"/dashboard/ops/account?user_id={USER}", "admin"),
        "ops: account, last page": (
            f"/dashboard/ops/account?user_id={USER}&before={oldest + 40}", "admin"),
        "ops: runs": ("/dashboard/ops/runs", "admin"),
        "ops: run report": (f"/dashboard/ops/runs/{run_id}", "admin"),
        "ops: dead letters": ("/dashboard/ops/dead-letters", "admin"),
        "ops: conflicts": ("/dashboard/ops/conflicts", "admin"),
        "ops: queue": ("/dashboard/ops/queue", "admin"),
        "ops: usage, every account, 7 days": ("/dashboard/ops/usage?days=7", "admin"),
        "ops: usage, every account, 30 days": ("/dashboard/ops/usage?days=30", "admin"),
        "ops: usage + monthly report, this month": (
            f"/dashboard/ops/usage?days=7&user_id={USER}", "admin"),
        "ops: usage + monthly report, a full month": (
            f"/dashboard/ops/usage?days=7&user_id={USER}&month={last_month}", "admin"),
    }
    results: dict[str, dict[str, float]] = {}
    with httpx.Client(base_url=api_server.url, timeout=60) as http:  # type: ignore
        for name, (path, scope) in pages.items():
            headers = auth(keys[scope]) if scope else {}
            times = []
            for _ in range(RENDERS + 1):
                r = http.get(path, headers=headers)
                assert r.status_code == 200, (name, r.text[:500])
                if "server-timing" in r.headers:
                    times.append(server_ms(r))
            times = times[1:]  # the first render warms the process's caches
            results[name] = {"median_ms": round(statistics.median(times), 1),
                             "best_ms": round(min(times), 1)}
    out = ROOT / "build" / "render-times.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"entries": ENTRIES, "renders": RENDERS, "pages": results},
                              indent=2) + "\n")
    width = max(map(len, results))
    print(f"\n{'page':<{width}}  median   best   (ms, server-side, {ENTRIES:,} entries)")
    for name, r in results.items():
        print(f"{name:<{width}}  {r['median_ms']:6.1f} {r['best_ms']:6.1f}")
    slow = {name: r for name, r in results.items()
            if r["best_ms"] > (HEAVY_BUDGET_MS if name in HEAVY else BUDGET_MS)}
    assert not slow, slow
