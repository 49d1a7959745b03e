"""This deployment's identity and the names of the rooms it makes.

A room is named `/<ROOMKEEPER_ROOM_PREFIX>-<identity>-<tag>-<caller's prefix>…`: the identity
(made once by `roomkeeper migrate`, kept in the database) tells this deployment's rooms from those
of another deployment on the same Whereby organisation, whatever their prefix, and the tag ties a
room to the attempt that made it. Rooms made before identities existed are named
`/<prefix>-<tag>-…`; they are ours only when the store knows them.
"""

from __future__ import annotations

import secrets
import string
from dataclasses import dataclass

from sqlalchemy.exc import IntegrityError
from sqlmodel import select

from worker.rules.lifecycle import TAG_LENGTH
from worker.runtime import resources
from worker.store import session_scope
from worker.store.models import Deployment, utcnow

_ALPHABET = string.ascii_lowercase + string.digits
IDENTITY_LENGTH = 5  # 36**5: two deployments of one organisation share one with odds of 1 in 60 million


def identity() -> str:
    """This deployment's identity: made by `roomkeeper migrate`, or on first use if it was removed.
    Read once per process (owned by worker.runtime.resources)."""
    return resources.own("deployment identity", lambda: _read() or _make())


def _read() -> str | None:
    with session_scope() as session:
        return session.execute(select(Deployment.identity).where(Deployment.id == 1)).scalar_one_or_none()


def _make() -> str:
    made = "".join(secrets.choice(_ALPHABET) for _ in range(IDENTITY_LENGTH))
    try:
        with session_scope() as session:
            session.add(Deployment(id=1, identity=made, created_at=utcnow()))
    except IntegrityError:  # another process made it first: theirs is ours
        pass
    found = _read()
    assert found is not None
    return found


def new_tag() -> str:
    """A fresh tag for one attempt's room name: TAG_LENGTH lowercase letters and digits."""
    return "".join(secrets.choice(_ALPHABET) for _ in range(TAG_LENGTH))


def room_name_prefix(service_prefix: str, identity: str, tag: str, caller_prefix: str | None) -> str:
    """The service's tag first, so one startsWith filter finds all of its rooms, or one attempt's."""
    return f"{service_prefix}-{identity}-{tag}-{caller_prefix or ''}"


@dataclass(frozen=True)
class RoomName:
    identity: str | None  # None: named before deployments had identities
    tag: str


def parse(room_name: str, service_prefix: str) -> RoomName | None:
    """Read the identity and tag out of a room name this service's naming could have made."""
    head = room_name.lstrip("/")
    if not head.startswith(f"{service_prefix}-"):
        return None
    parts = head[len(service_prefix) + 1 :].split("-")
    if len(parts) >= 2 and len(parts[0]) == IDENTITY_LENGTH and len(parts[1]) == TAG_LENGTH:
        return RoomName(parts[0], parts[1])
    if len(parts[0]) == TAG_LENGTH:
        return RoomName(None, parts[0])
    return None
