"""tokenledger's Celery workers: ``celery -A workers worker``."""

from workers.celery_app import app
from workers import tasks  # noqa: F401,E402 - registers the tasks

__all__ = ["app"]
