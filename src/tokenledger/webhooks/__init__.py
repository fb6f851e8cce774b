"""Webhooks that arrive: endpoints, a transactional outbox, signed deliveries with retries."""
