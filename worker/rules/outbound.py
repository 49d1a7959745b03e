"""What a URL the service would call on a caller's behalf must be (CONTRACT §3), decided from the URL
and the settings alone: no name is resolved here and no socket opened.

A URL is allowed when it is `https` on a port of ROOMKEEPER_OUTBOUND_PUBLIC_PORTS to a public host,
or when its host is listed in ROOMKEEPER_OUTBOUND_ALLOWED_HOSTS (then `http` and any port too). A
host given as an address is judged here; a host given by name is judged by
worker.adapters.outbound, which resolves it, when the URL is checked there and before each request.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from config.settings import Settings

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class OutboundRefused(ValueError):
    """The URL may not be called; the message says why (never with its credentials)."""


# IPv6 forms that carry an IPv4 address the connection really reaches: NAT64 (RFC 6052, 8215) and
# the deprecated IPv4-compatible form. Python's `is_global` judges them by the IPv6 prefix alone.
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_V4_COMPATIBLE = ipaddress.ip_network("::/96")


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]  # the client's address
    if any(address in network for network in (*_NAT64, _V4_COMPATIBLE)):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def is_public(address: Address) -> bool:
    """Whether the service may connect to `address` on a caller's behalf."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None and not is_public(embedded):
            return False
    # `is_global` leaves multicast (224/4, ff00::/8) global; nothing the service POSTs to is there.
    return address.is_global and not address.is_multicast


def literal_address(host: str) -> Address | None:
    """The address a host written as an IP address names, else None (a name)."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def refuse_private(host: str, address: Address) -> None:
    """Raise OutboundRefused when `address` (which `host` names) is not public."""
    if not is_public(address):
        raise OutboundRefused(
            f"host {host!r} is a private, loopback or reserved address ({address}); list it in "
            "ROOMKEEPER_OUTBOUND_ALLOWED_HOSTS to allow it"
        )


def url_host(url: str) -> str:
    """The URL's host as the rules compare it (lowercase, no brackets)."""
    return (urlsplit(url).hostname or "").lower()


def check_url(url: str, settings: Settings) -> str:
    """Return `url` if nothing in it or in the settings forbids calling it, else raise OutboundRefused
    naming the rule. A host given by name still has to resolve to public addresses only (the
    adapter's check_url asks, this does not)."""
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
    port = parts.port or 443
    if port not in settings.public_ports:
        allowed = ", ".join(str(p) for p in sorted(settings.public_ports))
        raise OutboundRefused(
            f"port {port} is not allowed for public hosts (ROOMKEEPER_OUTBOUND_PUBLIC_PORTS: {allowed})"
        )
    address = literal_address(host)
    if address is not None:
        refuse_private(host, address)
    return url
