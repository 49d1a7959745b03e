"""The database: engines for SQLite and PostgreSQL, sessions, and the Alembic migration entry point."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlmodel import Session

from config.settings import get_settings
from worker.runtime import resources

log = logging.getLogger(__name__)


class _Engines:
    """This process's engines (owned by worker.runtime.resources, disposed on reset).

    SQLite has one writer at a time, and a writer that finds the file locked sleeps in SQLite's busy
    handler (1, 2, 5, 10 ... 100 ms naps) rather than queueing. Threads of one process therefore
    take turns on a lock of their own first (`turns`); only other processes meet the busy handler.
    """

    def __init__(self) -> None:
        self.engines: dict[tuple[str, int], Engine] = {}
        self.turns: dict[Engine, threading.RLock] = {}

    def dispose(self) -> None:
        for engine in self.engines.values():
            engine.dispose()
        self.engines.clear()
        self.turns.clear()


def _held() -> _Engines:
    return resources.own("database engines", _Engines, _Engines.dispose)


MIGRATIONS = Path(__file__).with_name("migrations")


def sqlalchemy_url(url: str) -> str:
    """The contract's plain postgresql:// URL, driven by psycopg 3."""
    for plain in ("postgresql://", "postgres://"):
        if url.startswith(plain):
            return "postgresql+psycopg://" + url[len(plain) :]
    return url


def _sqlite_engine(url: str) -> Engine:
    database = make_url(url).database
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the sqlite3 module, decide when transactions begin (see below).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        # WAL lets readers run beside the one writer; busy_timeout makes the other writers wait
        # instead of failing, so several worker processes and beat can share one file.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        # Take the write lock at BEGIN: a read-then-write transaction can then never be
        # upgraded into a "database is locked" deadlock, and the read it makes stays true.
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def get_engine(url: str | None = None) -> Engine:
    url = sqlalchemy_url(url or get_settings().database_url)
    # One engine per process: a forked worker child must not share its parent's connections.
    key = (url, os.getpid())
    held = _held()
    engine = held.engines.get(key)
    if engine is None:
        if url.startswith("sqlite"):
            engine = _sqlite_engine(url)
            held.turns[engine] = threading.RLock()
        else:
            engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)
        held.engines[key] = engine
    return engine


def dispose_engines() -> None:
    _held().dispose()


@contextmanager
def session_scope() -> Iterator[Session]:
    """One transaction: committed when the block ends, rolled back if it raises."""
    engine = get_engine()
    turn = _held().turns.get(engine)
    with turn or nullcontext(), Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


def alembic_config(url: str | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    # configparser interpolates "%": a percent-encoded password or option must be doubled.
    url = sqlalchemy_url(url or get_settings().database_url).replace("%", "%%")
    config.set_main_option("sqlalchemy.url", url)
    return config


def migrate(url: str | None = None) -> None:
    """Create or upgrade the schema to the newest revision; safe to run again."""
    command.upgrade(alembic_config(url), "head")
    log.info("database schema is up to date")
