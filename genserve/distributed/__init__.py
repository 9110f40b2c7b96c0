"""Multi-node mode: Celery on Redis wakes workers; PostgreSQL stays the source of truth (docs/scaling.md)."""
