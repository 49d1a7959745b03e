"""Where the service may send requests on a caller's behalf (notify URLs, calendar feeds): CONTRACT §3.

A caller must not be able to make the service reach into its own private network. A URL is allowed
when it is `https` to a host whose every address is public, on a port of
ROOMKEEPER_OUTBOUND_PUBLIC_PORTS, or when its host is listed in ROOMKEEPER_OUTBOUND_ALLOWED_HOSTS
(then `http` and any port too). Checked when the URL is given and again before each request, since a
name can come to point elsewhere.

`request()` is the one way feeds (ICS and CalDAV) reach out: every hop checked, the connection made
to the very address that was checked (and to nothing else), no proxy from the environment, redirects
followed only by hand and each checked, one total deadline that bounds every socket operation, and
failures described without detail that maps the network behind the host.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpcore
import httpx

from config.settings import Settings
from worker.rules import outbound as rules

# The rules that need no network live in worker.rules.outbound; re-exported here under their names.
from worker.rules.outbound import Address as Address
from worker.rules.outbound import OutboundRefused as OutboundRefused
from worker.rules.outbound import is_public as is_public

log = logging.getLogger(__name__)


def _addresses(host: str) -> list[Address]:
    literal = rules.literal_address(host)
    if literal is not None:
        return [literal]
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        raise OutboundRefused(f"host {host!r} does not resolve") from None
    return [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]


def check_url(url: str, settings: Settings, *, resolve: bool = True) -> str:
    """Return `url` if the service may call it, else raise OutboundRefused naming the rule: the
    rules' check (worker.rules.outbound), then, unless `resolve` is False, every address its host
    name resolves to must be public."""
    rules.check_url(url, settings)
    host = rules.url_host(url)
    if not resolve or host in settings.allowed_hosts:
        return url
    for address in _addresses(host):
        rules.refuse_private(host, address)
    return url


def connect_address(url: str, settings: Settings) -> Address | None:
    """Check `url` as check_url does and return the checked address to connect to, so a name that
    answers differently the next time (DNS rebinding) cannot move the request; None for a host
    listed in ROOMKEEPER_OUTBOUND_ALLOWED_HOSTS, which is trusted by name."""
    rules.check_url(url, settings)
    host = rules.url_host(url)
    if host in settings.allowed_hosts:
        return None
    addresses = _addresses(host)
    for address in addresses:
        rules.refuse_private(host, address)
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


# --------------------------------------------------------------------------------------------
# One guarded request (feeds): the checked address only, a total deadline, redirects by hand.


class OutboundFailed(RuntimeError):
    """The request did not complete. The message is deliberately coarse: whether a port refused,
    dropped or timed out is not told to the caller (the detail goes to the log)."""


@dataclass(frozen=True)
class Answer:
    status: int
    headers: httpx.Headers
    body: bytes  # empty unless 2xx
    url: str  # the URL that answered (after redirects)


REDIRECTS = frozenset({301, 302, 303, 307, 308})


class _DeadlineStream(httpcore.NetworkStream):
    """A socket whose every read, write and handshake is cut short at the request's deadline, so a
    server that drips its answer a byte at a time cannot stretch the request past it."""

    def __init__(self, inner: httpcore.NetworkStream, backend: _GuardedBackend) -> None:
        self._inner, self._backend = inner, backend

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, self._backend.clamp(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, self._backend.clamp(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        inner = self._inner.start_tls(
            ssl_context, server_hostname, self._backend.clamp(timeout, httpcore.ConnectTimeout)
        )
        return _DeadlineStream(inner, self._backend)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _GuardedBackend(httpcore.NetworkBackend):
    """Connects only to the (host, port) the current hop was checked for, within the deadline."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.expected: tuple[str, int] | None = None
        self._inner = httpcore.SyncBackend()

    def clamp(self, timeout: float | None, error: type[Exception]) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise error("the total deadline has passed")
        return left if timeout is None else min(timeout, left)

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.NetworkStream:
        if self.expected is None or (host.strip("[]").lower(), port) != self.expected:
            raise httpcore.ConnectError("not the address that was checked")
        stream = self._inner.connect_tcp(
            host, port, self.clamp(timeout, httpcore.ConnectTimeout), local_address, socket_options
        )
        return _DeadlineStream(stream, self)

    def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options: Any = None) -> Any:
        raise httpcore.ConnectError("unix sockets are not outbound")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


@functools.cache
def _tls() -> ssl.SSLContext:
    # Loading the CA bundle takes about 60 ms of CPU: one context serves every request (it is shared safely).
    return httpx.create_ssl_context(trust_env=False)


class _GuardedTransport(httpx.HTTPTransport):
    def __init__(self, backend: _GuardedBackend) -> None:
        super().__init__(verify=_tls(), trust_env=False, retries=0)
        # httpx has no argument for the network backend: its pool is rebuilt with ours. No proxy,
        # whatever the environment says (trust_env=False above and here).
        self._pool = httpcore.ConnectionPool(
            ssl_context=_tls(),
            max_connections=2,
            network_backend=backend,
        )


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port


def request(
    method: str,
    url: str,
    settings: Settings,
    *,
    deadline: float,
    max_bytes: int,
    headers: dict[str, str] | None = None,
    content: bytes | None = None,
    auth: tuple[str, str] | None = None,
    redirects: int = 0,
) -> Answer:
    """One request under the outbound rules, finished by `deadline` (time.monotonic()).

    Each hop's URL is checked and the connection goes to the address that was checked; a redirect
    (at most `redirects` of them) is followed only after its target passes the same check, and
    credentials are not sent on to another origin. A 2xx body over `max_bytes` fails. Raises
    OutboundRefused (a URL against the rules) or OutboundFailed (no usable answer in time)."""
    backend = _GuardedBackend(deadline)
    first_origin = _origin(url)
    with httpx.Client(
        transport=_GuardedTransport(backend), trust_env=False, follow_redirects=False
    ) as client:
        for _hop in range(redirects + 1):
            address = connect_address(url, settings)
            target, pinned_headers, extensions = pinned(url, address)
            parts = urlsplit(target)
            backend.expected = (
                (parts.hostname or "").lower(),
                parts.port or (443 if parts.scheme == "https" else 80),
            )
            send_auth = auth if _origin(url) == first_origin else None
            try:
                with client.stream(
                    method,
                    target,
                    headers={**(headers or {}), **pinned_headers},
                    content=content,
                    auth=httpx.BasicAuth(*send_auth) if send_auth else None,
                    extensions=extensions,
                    timeout=httpx.Timeout(max(0.001, deadline - time.monotonic())),
                ) as response:
                    location = response.headers.get("location")
                    if response.status_code in REDIRECTS and location and _hop < redirects:
                        url = str(httpx.URL(url).join(location))
                        if response.status_code == 303:
                            method, content = "GET", None
                        continue
                    body = _read(response, deadline, max_bytes) if response.is_success else b""
                    return Answer(response.status_code, response.headers, body, url)
            except httpx.HTTPError as exc:
                log.info("outbound %s %s failed: %s: %s", method, _shown(url), type(exc).__name__, exc)
                raise OutboundFailed("no connection, or no answer in time") from None
        raise OutboundFailed(f"redirected more than {redirects} times")


def _read(response: httpx.Response, deadline: float, max_bytes: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_bytes():
        size += len(chunk)
        if size > max_bytes:
            raise OutboundFailed(f"the answer is larger than {max_bytes} bytes")
        if time.monotonic() > deadline:
            raise httpx.ReadTimeout("the total deadline has passed")
        chunks.append(chunk)
    return b"".join(chunks)


def _shown(url: str) -> str:
    # Logs show scheme, host and path: a query string may hold the caller's secret.
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))
