"""``celery -A workers worker`` from a checkout of the repository.

The Celery application is ``tokenledger.queue.app`` (installed with the package: ``celery
-A tokenledger.queue.app worker``, or ``tokenledger worker``); its tasks live in the
domain packages. This folder is not installed.
"""

from tokenledger.queue.app import app

__all__ = ["app"]
