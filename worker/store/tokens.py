"""Bearer tokens for the HTTP face (CONTRACT §4.2): made once, kept only as a SHA-256, revocable.

A token is `rk_` and 32 random bytes (URL-safe base64), so a leaked one is easy to recognise in a
log or a repository scan. The store keeps its SHA-256 only: a token is found by the hash of what
the caller sent, so the secret itself is never compared, stored or shown again.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select

from worker.store import session_scope
from worker.store.models import ApiToken, utcnow

log = logging.getLogger(__name__)

PREFIX = "rk_"
NAME = re.compile(r"^[a-z0-9._-]{1,100}$")
# last_used_at is a hint for operators, not an audit log: written at most this often per token, so
# a busy caller does not turn every request into a write.
TOUCH_EVERY = timedelta(minutes=1)
# A well-formed token: the prefix and 43 URL-safe base64 characters (32 bytes).
_SHAPE = re.compile(r"^rk_[A-Za-z0-9_-]{43}$")


class TokenError(ValueError):
    """A token operation that cannot be done; the message says why."""


@dataclass(frozen=True)
class TokenInfo:
    name: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_name(name: str) -> str:
    if not NAME.match(name):
        raise TokenError(f"name: {name!r} must be 1 to 100 characters of a-z, 0-9, '.', '_' and '-'")
    return name


def create(name: str) -> str:
    """Make a token called `name` and return it: the only time it is ever seen."""
    check_name(name)
    token = PREFIX + secrets.token_urlsafe(32)
    try:
        with session_scope() as session:
            session.add(ApiToken(name=name, token_hash=digest(token), created_at=utcnow()))
    except IntegrityError:
        raise TokenError(
            f"name: a token called {name!r} exists already (revoked ones keep their name)"
        ) from None
    log.info("api token %s created", name)
    return token


def list_tokens() -> list[TokenInfo]:
    with session_scope() as session:
        rows = session.execute(select(ApiToken).order_by(col(ApiToken.name))).scalars()
        return [TokenInfo(t.name, t.created_at, t.last_used_at, t.revoked_at) for t in rows]


def revoke(name: str) -> bool:
    """Revoke the token called `name`; False when there is none (revoking again is not an error)."""
    with session_scope() as session:
        token = session.execute(select(ApiToken).where(ApiToken.name == name)).scalar_one_or_none()
        if token is None:
            return False
        if token.revoked_at is None:
            token.revoked_at = utcnow()
            log.info("api token %s revoked", name)
        return True


def well_formed(token: str) -> bool:
    return bool(_SHAPE.match(token))


def authenticate(token: str, now: datetime | None = None) -> str | None:
    """The name of the live token `token`, or None for one that is malformed, unknown or revoked."""
    if not well_formed(token):
        return None
    now = now or utcnow()
    hashed = digest(token)
    with session_scope() as session:
        row = session.execute(select(ApiToken).where(ApiToken.token_hash == hashed)).scalar_one_or_none()
        # The lookup already matched the hash; comparing again in constant time costs nothing and
        # keeps the secret-dependent comparison out of the database's hands.
        if row is None or row.revoked_at is not None or not hmac.compare_digest(row.token_hash, hashed):
            return None
        if row.last_used_at is None or now - row.last_used_at >= TOUCH_EVERY:
            row.last_used_at = now
        return str(row.name)
