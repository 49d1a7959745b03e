"""Alembic environment: runs the migrations against the store's configured database."""

from __future__ import annotations

from alembic import context
from sqlmodel import SQLModel

import worker.store.models  # noqa: F401  (registers the tables on SQLModel.metadata)
from worker.store import get_engine

target_metadata = SQLModel.metadata


def run_migrations_online() -> None:
    url = context.config.get_main_option("sqlalchemy.url")
    with get_engine(url).connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",
        )
        with context.begin_transaction():
            context.run_migrations()


run_migrations_online()
