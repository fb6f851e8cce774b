"""The dashboard: pages served by the API process under ``/dashboard``.

For end users, through a signed link their app mints (``dashboard.user``): balance,
wallets, holds, features ready now, the next reset, history, and a live balance badge.
For operators, with an admin key or a session opened with one (``dashboard.operators``,
changes through ``dashboard.actions``). Server-rendered Jinja templates, charts drawn as
SVG, and two small scripts, all shipped in the package: nothing is fetched from elsewhere.
"""

from __future__ import annotations

from typing import Any

from fastapi.staticfiles import StaticFiles


def mount(app: Any) -> None:
    """Add the dashboard's routes, assets and error pages to the API ``app``."""
    from tokenledger.dashboard import access, actions, operators, user

    access.install(app)
    for module in (user, operators, actions):
        app.include_router(module.router)
    app.mount("/dashboard/static",
              StaticFiles(packages=[("tokenledger.dashboard", "static")]),
              name="dashboard-static")


def open_feed(app: Any, settings: Any) -> None:
    """The process's balance feed for badges (subscribed with the first badge)."""
    from tokenledger.dashboard.live import BalanceFeed

    app.state.dashboard_feed = BalanceFeed(settings)


def close(app: Any) -> None:
    """End what :func:`open_feed` started (in the app's lifespan)."""
    feed = getattr(app.state, "dashboard_feed", None)
    if feed is not None:
        feed.close()
