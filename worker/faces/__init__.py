"""How callers and operators reach the service: the HTTP face, the CLI, Flower (tasks/ is the Celery face)."""
