"""The processes' machinery: the Celery app, beat, the pool, and the per-process resources."""
