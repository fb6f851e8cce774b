"""The Celery application of the workers: ``celery -A tokenledger.queue.app worker``.

Built from the ``TOKENLEDGER_*`` environment when imported; the tasks live in the domain
packages (``ledger.tasks``, ``tokenprocess.tasks``, ``renewals.tasks``, ``webhooks.tasks``,
``retention.tasks``) and are imported by the worker at start-up.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any

from celery import Celery
from celery.signals import setup_logging, worker_init, worker_process_init, worker_process_shutdown

from tokenledger.config import get_settings
from tokenledger.db.engine import configure_pool, dispose_engines
from tokenledger.ops.logs import configure_logging, mask_url
from tokenledger.queue import beat
from tokenledger.queue.config import celery_config
from tokenledger.queue.consumer import IntakeStep

TASK_MODULES = ["tokenledger.ledger.tasks", "tokenledger.tokenprocess.tasks",
                "tokenledger.renewals.tasks", "tokenledger.webhooks.tasks",
                "tokenledger.retention.tasks"]

settings = get_settings()
if settings.metrics_port and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    # Pool children count into files that the main process sums on the metrics port; the
    # directory must be known before any metric exists (tokenledger.ops.metrics).
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="tokenledger-metrics-")
if not logging.getLogger().handlers:
    # A worker, beat or flower process: JSON from the first line, since Celery warns (about
    # running as root, say) before it sends setup_logging. A host process that configured
    # logging itself (pytest, an embedding app) keeps its own.
    configure_logging(settings.log_level, settings.log_json)
app = Celery("tokenledger", set_as_current=True)
app.conf.update(celery_config(settings))
app.conf.update(imports=TASK_MODULES)
beat.configure(app)  # the beat schedule and its single-scheduler lock
app.steps["consumer"].add(IntakeStep)  # both queues; the ledger's in bulk on Redis


@worker_process_init.connect
def _fresh_pool(**_: Any) -> None:
    # A forked child must not reuse the parent's pooled database connections. No ping
    # before each unit of work (a round trip per group): a connection the server dropped
    # fails its first statement, SQLAlchemy then renews the whole pool, and the failure
    # policy (ledger.tasks) runs the group again at once.
    dispose_engines()
    configure_pool(pre_ping=False)


@setup_logging.connect
def _json_logs(loglevel: Any = None, **_: Any) -> None:
    # Connecting this signal stops Celery configuring logging: every line is JSON.
    configure_logging(loglevel or settings.log_level, settings.log_json)


@worker_init.connect
def _worker_starting(**_: Any) -> None:
    from tokenledger.ops import metrics

    logging.getLogger("tokenledger.worker").info(
        "worker starting", extra={"database": mask_url(settings.ledger_url()),
                                  "broker": mask_url(settings.broker()),
                                  "queue": settings.queue})
    metrics.serve_worker_metrics(settings)


@worker_process_shutdown.connect
def _forget_child(pid: int | None = None, **_: Any) -> None:
    from tokenledger.ops import metrics

    metrics.mark_process_dead(pid or os.getpid())
