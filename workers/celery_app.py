"""The Celery application. ``celery -A workers worker`` finds it as ``workers.app``."""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.signals import worker_process_init

from tokenledger.broker import celery_config
from tokenledger.config import get_settings
from tokenledger.db import dispose_engines

settings = get_settings()
app = Celery("tokenledger", set_as_current=True)
app.conf.update(celery_config(settings))
app.conf.update(imports=["workers.tasks", "workers.tokenprocess_tasks"])


@worker_process_init.connect
def _fresh_pool(**_: Any) -> None:
    # A forked child must not reuse the parent's pooled database connections.
    dispose_engines()
