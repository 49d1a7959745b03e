"""Where the service may send requests on a caller's behalf (notify URLs, calendar feeds): CONTRACT §3.

A caller must not be able to make the service reach into its own private network. A URL is allowed
when it is `https` to a host whose every address is public, or when its host is listed in
ROOMKEEPER_OUTBOUND_ALLOWED_HOSTS (then `http` too). Checked when the URL is given and again before
each request, since a name can come to point elsewhere.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

from config.settings import Settings


class OutboundRefused(ValueError):
    """The URL may not be called; the message says why (never with its credentials)."""


def _addresses(host: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        raise OutboundRefused(f"host {host!r} does not resolve") from None
    return [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]


def check_url(url: str, settings: Settings, *, resolve: bool = True) -> str:
    """Return `url` if the service may call it, else raise OutboundRefused naming the rule."""
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError:
        raise OutboundRefused("is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not host:
        raise OutboundRefused("must be an http(s) URL with a host")
    if parts.username is not None or parts.password is not None:
        raise OutboundRefused("must not carry credentials in the URL")
    if host in settings.allowed_hosts:
        return url
    if parts.scheme != "https":
        raise OutboundRefused(
            f"must be https (or its host {host!r} listed in ROOMKEEPER_OUTBOUND_ALLOWED_HOSTS)"
        )
    if not resolve:
        return url
    for address in _addresses(host):
        if not address.is_global:
            raise OutboundRefused(
                f"host {host!r} is a private, loopback or reserved address ({address}); list it in "
                "ROOMKEEPER_OUTBOUND_ALLOWED_HOSTS to allow it"
            )
    return url
