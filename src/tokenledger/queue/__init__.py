"""Infrastructure for Celery: the app, the base task, beat, task names, the producer and
the embedded Redis. ``celery -A tokenledger.queue.app worker`` runs a worker."""
