"""Bearer tokens (CONTRACT §4.2): made once, stored only as a SHA-256, revocable, named by rule;
through the functions and through the real `roomkeeper tokens` command, on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import os
import subprocess
from datetime import timedelta

import pytest
from sqlalchemy import text
from sqlmodel import select

from worker.devtools.harness import BIN, ROOT
from worker.store import get_engine, session_scope, tokens
from worker.store.models import ApiToken, utcnow


@pytest.fixture
def store(configured: str) -> str:
    with get_engine(configured).begin() as connection:
        connection.execute(text("DELETE FROM api_token"))
    return configured


def stored_rows() -> list[ApiToken]:
    with session_scope() as session:
        return list(session.execute(select(ApiToken)).scalars())


def test_a_token_is_shown_once_and_stored_only_as_its_hash(store: str) -> None:
    token = tokens.create("booking-app")
    assert token.startswith("rk_") and len(token) == 46 and tokens.well_formed(token)
    (row,) = stored_rows()
    assert row.name == "booking-app"
    assert row.token_hash == hashlib.sha256(token.encode()).hexdigest()
    with get_engine(store).connect() as connection:
        dumped = repr(connection.execute(text("SELECT * FROM api_token")).all())
    assert token not in dumped and token[3:] not in dumped
    assert tokens.create("other") != token


@pytest.mark.parametrize("name", ["", "UPPER", "has space", "a/b", "é", "x" * 101, "nul\x00"])
def test_names_follow_the_rule(store: str, name: str) -> None:
    with pytest.raises(tokens.TokenError, match=r"^name: .*a-z, 0-9"):
        tokens.create(name)
    assert stored_rows() == []


def test_a_name_is_unique_even_once_revoked(store: str) -> None:
    tokens.create("app.v1_x-y")
    assert tokens.revoke("app.v1_x-y")
    with pytest.raises(tokens.TokenError, match="exists already"):
        tokens.create("app.v1_x-y")
    assert len(stored_rows()) == 1


def test_authenticate_knows_live_tokens_only(store: str) -> None:
    token = tokens.create("app")
    assert tokens.authenticate(token) == "app"
    assert tokens.authenticate(token + "x") is None  # malformed
    assert tokens.authenticate("rk_" + "A" * 43) is None  # well formed, unknown
    assert tokens.authenticate(token.upper()) is None
    assert tokens.authenticate("") is None
    assert tokens.revoke("app") and tokens.revoke("app")  # revoking again is not an error
    assert tokens.authenticate(token) is None
    assert not tokens.revoke("never-made")


def test_last_used_is_written_at_most_once_a_minute(store: str) -> None:
    token = tokens.create("app")
    (row,) = stored_rows()
    assert row.last_used_at is None
    first = utcnow()
    tokens.authenticate(token, now=first)
    tokens.authenticate(token, now=first + timedelta(seconds=30))
    (row,) = stored_rows()
    assert row.last_used_at is not None and abs(row.last_used_at - first) < timedelta(milliseconds=1)
    later = first + timedelta(seconds=61)
    tokens.authenticate(token, now=later)
    (row,) = stored_rows()
    assert row.last_used_at is not None and abs(row.last_used_at - later) < timedelta(milliseconds=1)


def roomkeeper(database: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ROOMKEEPER_", "WHEREBY_"))}
    env.update(ROOMKEEPER_DATABASE_URL=database, WHEREBY_API_URL="http://127.0.0.1:9/v1")
    return subprocess.run(
        [str(BIN / "roomkeeper"), "tokens", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_tokens_command(store: str) -> None:
    made = roomkeeper(store, "create", "booking-app")
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert tokens.well_formed(token), "the token alone on stdout"
    assert "shown only this once" in made.stderr and token not in made.stderr
    assert tokens.authenticate(token) == "booking-app"

    again = roomkeeper(store, "create", "booking-app")
    assert again.returncode == 1 and "exists already" in again.stderr and again.stdout == ""
    bad = roomkeeper(store, "create", "Bad Name")
    assert bad.returncode == 1 and "name:" in bad.stderr

    listed = roomkeeper(store, "list")
    assert listed.returncode == 0 and "booking-app" in listed.stdout and token not in listed.stdout

    revoked = roomkeeper(store, "revoke", "booking-app")
    assert revoked.returncode == 0 and "revoked" in revoked.stdout
    assert tokens.authenticate(token) is None
    listed = roomkeeper(store, "list")
    assert str(utcnow().year) in listed.stdout.split("booking-app", 1)[1]  # the revoked column filled
    unknown = roomkeeper(store, "revoke", "nobody")
    assert unknown.returncode == 1 and "no token called 'nobody'" in unknown.stderr
