"""The Celery app under the name the Procfile and docker-compose give it (`celery -A worker.app`).

The app itself lives in `worker/runtime/app.py`; this name stays so deployments keep working."""

from worker.runtime.app import app

__all__ = ["app"]
