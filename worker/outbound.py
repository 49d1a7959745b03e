"""Where the service may send requests on a caller's behalf (notify URLs, calendar feeds): CONTRACT §3.

A caller must not be able to make the service reach into its own private network. A URL is allowed
when it is `https` to a host whose every address is public, or when its host is listed in
ROOMKEEPER_OUTBOUND_ALLOWED_HOSTS (then `http` too). Checked when the URL is given and again before
each request, since a name can come to point elsewhere.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit, urlunsplit

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


def is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether the service may connect to `address` on a caller's behalf."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None and not is_public(embedded):
            return False
    # `is_global` leaves multicast (224/4, ff00::/8) global; nothing the service POSTs to is there.
    return address.is_global and not address.is_multicast


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
        if not is_public(address):
            raise OutboundRefused(
                f"host {host!r} is a private, loopback or reserved address ({address}); list it in "
                "ROOMKEEPER_OUTBOUND_ALLOWED_HOSTS to allow it"
            )
    return url


def connect_address(url: str, settings: Settings) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """Check `url` as check_url does and return the checked address to connect to, so a name that
    answers differently the next time (DNS rebinding) cannot move the request; None for a host
    listed in ROOMKEEPER_OUTBOUND_ALLOWED_HOSTS, which is trusted by name."""
    check_url(url, settings, resolve=False)
    host = (urlsplit(url).hostname or "").lower()
    if host in settings.allowed_hosts:
        return None
    addresses = _addresses(host)
    for address in addresses:
        if not is_public(address):
            raise OutboundRefused(
                f"host {host!r} is a private, loopback or reserved address ({address}); list it in "
                "ROOMKEEPER_OUTBOUND_ALLOWED_HOSTS to allow it"
            )
    return addresses[0]


def pinned(
    url: str, address: ipaddress.IPv4Address | ipaddress.IPv6Address | None
) -> tuple[str, dict[str, str], dict[str, str]]:
    """The request for `url` sent to `address`: (URL naming the address, headers, httpx extensions).
    The Host header and the TLS server name (SNI, and the name the certificate must match) stay the
    URL's own host."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        ipaddress.ip_address(host)
        literal = True
    except ValueError:
        literal = False
    if address is None or literal:
        return url, {}, {}
    target = f"[{address}]" if address.version == 6 else str(address)
    netloc = f"{target}:{parts.port}" if parts.port else target
    return (
        urlunsplit((parts.scheme, netloc, parts.path, parts.query, "")),
        {"Host": parts.netloc},
        {"sni_hostname": host},
    )
