"""The deployment identity: made once by `roomkeeper migrate`, kept in the store, in every room name."""

from __future__ import annotations

import re
from pathlib import Path

from sqlalchemy import text

from tests.conftest import apply_settings
from worker import store
from worker.store import deployment
from worker.store.deployment import IDENTITY_LENGTH


def _fresh(tmp_path: Path, name: str) -> str:
    url = f"sqlite:///{tmp_path / name}"
    store.migrate(url)
    return url


def test_each_migrated_store_has_an_identity_of_its_own_that_stays(tmp_path: Path) -> None:
    try:
        seen = []
        for name in ("staging.db", "production.db"):
            apply_settings(ROOMKEEPER_DATABASE_URL=_fresh(tmp_path, name))
            first = deployment.identity()
            assert re.fullmatch(rf"[a-z0-9]{{{IDENTITY_LENGTH}}}", first)
            store.migrate()  # migrating again keeps it
            apply_settings()  # a new process reads the same one
            assert deployment.identity() == first
            seen.append(first)
        assert seen[0] != seen[1]
    finally:
        apply_settings(ROOMKEEPER_DATABASE_URL=None)


def test_a_removed_identity_is_made_afresh_on_first_use(tmp_path: Path) -> None:
    url = _fresh(tmp_path, "copy.db")
    try:
        apply_settings(ROOMKEEPER_DATABASE_URL=url)
        copied = deployment.identity()
        with store.get_engine(url).begin() as connection:
            connection.execute(text("DELETE FROM deployment"))
        apply_settings()
        fresh = deployment.identity()
        assert fresh != copied
        apply_settings()
        assert deployment.identity() == fresh
    finally:
        apply_settings(ROOMKEEPER_DATABASE_URL=None)
