"""Flower never serves anonymously beyond this host.

Flower 2 keeps its API closed without auth, but its pages are open, and its task list carries every
`rooms.schedule_meeting` result: meeting views with host room keys. So `roomkeeper flower` starts
Flower only with credentials (`FLOWER_BASIC_AUTH`, or Flower's OAuth: `FLOWER_AUTH` with
`FLOWER_AUTH_PROVIDER`) or on a loopback address.

Flower reads its `FLOWER_*` variables itself, before its command line: the address checked here is
passed on the command line, so a `FLOWER_ADDRESS` in the environment cannot widen it.
"""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Mapping

LOOPBACK_NAMES = frozenset({"localhost", "ip6-localhost"})


def is_loopback(address: str) -> bool:
    """Whether Flower listening on `address` is reachable from this host only."""
    if address.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False  # "" (every interface), 0.0.0.0, ::, a host name: reachable from elsewhere


def basic_auth_problem(value: str) -> str | None:
    """What is wrong with a `FLOWER_BASIC_AUTH` value (Flower's `user:password[,user:password]`)."""
    for entry in value.split(","):
        user, colon, password = entry.partition(":")
        if not (colon and user.strip() and password):
            return (
                "FLOWER_BASIC_AUTH must be user:password (several separated by commas), "
                "each with a user and a password"
            )
    return None


def credentials(env: Mapping[str, str]) -> str | None:
    """The variable that puts Flower behind a login, if any is set."""
    if env.get("FLOWER_BASIC_AUTH"):
        return "FLOWER_BASIC_AUTH"
    # FLOWER_AUTH (the e-mail addresses let in) closes every page; the provider lets them log in.
    if env.get("FLOWER_AUTH") and env.get("FLOWER_AUTH_PROVIDER"):
        return "FLOWER_AUTH"
    return None


def refusal(env: Mapping[str, str], address: str) -> str | None:
    """Why Flower must not start with this environment on this address; None when it may."""
    basic = env.get("FLOWER_BASIC_AUTH")
    if basic:
        return basic_auth_problem(basic)
    if credentials(env) or is_loopback(address):
        return None
    where = address or "every interface"
    return (
        f"refusing to serve Flower on {where} without credentials: its task list shows every "
        "meeting view, host room keys included. Set FLOWER_BASIC_AUTH=user:password (or Flower's "
        "FLOWER_AUTH with FLOWER_AUTH_PROVIDER), or listen on loopback only (--address=127.0.0.1)"
    )


def command(port: int, address: str) -> list[str]:
    """Flower's command line, run by this interpreter (so by this environment's Celery)."""
    argv = [sys.executable, "-m", "celery", "-A", "worker.runtime.app", "flower", f"--port={port}"]
    if address:
        argv.append(f"--address={address}")
    return argv
