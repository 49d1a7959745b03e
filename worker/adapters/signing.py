"""Webhook signatures, the way Stripe and Whereby sign: made for the events POSTed to notify URLs
(CONTRACT §4.4), checked on Whereby's webhooks; the sandbox and the bench sign with it too.

`<Name>-Signature: t=UNIX,v1=HEX`, HEX being HMAC-SHA256 over `"{t}.{raw body}"`. The timestamp is
signed too, so a receiver refuses old replays: a timestamp outside the tolerance is refused.
"""

from __future__ import annotations

import hashlib
import hmac
from urllib.parse import urlsplit

# Signature timestamps older (or further ahead) than this are refused: a replay.
TOLERANCE_SECONDS = 300.0
_HEX = frozenset("0123456789abcdefABCDEF")


class BadSignature(ValueError):
    """The request is not signed by the secret's holder (or is a replay); the message says why."""


def _digest(secret: str, stamp: str, body: bytes) -> str:
    return hmac.new(secret.encode(), stamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def signature(secret: str, body: bytes, timestamp: int) -> str:
    """The signature header's value for `body` sent at `timestamp`."""
    return f"t={timestamp},v1={_digest(secret, str(timestamp), body)}"


def signature_fields(header: str | None, name: str) -> tuple[str, list[str]]:
    """The timestamp and the v1 signatures of a `name` header, or BadSignature for a header of any
    other shape (never another error: the caller is not yet authenticated)."""
    if not header:
        raise BadSignature(f"{name} header missing")
    shape = f"{name} must be t=<unix seconds>,v1=<64 hex digits>"
    if len(header) > 2048 or not header.isascii():
        raise BadSignature(shape)
    stamp: str | None = None
    signatures: list[str] = []
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t":
            stamp = value
        elif key == "v1" and len(value) == 64 and set(value) <= _HEX:
            signatures.append(value.lower())
    # Ten digits until the year 2286; twelve leaves room and keeps int() trivially cheap.
    if stamp is None or not stamp.isdigit() or len(stamp) > 12 or not signatures:
        raise BadSignature(shape)
    return stamp, signatures


def verify(
    secret: str,
    body: bytes,
    header: str | None,
    now: float,
    *,
    name: str,
    tolerance: float = TOLERANCE_SECONDS,
) -> None:
    """Check the `name` header over the raw `body` at unix time `now`, in constant time; raises
    BadSignature when the header is malformed, too old or too new, or signs another body."""
    stamp, signatures = signature_fields(header, name)
    if abs(now - int(stamp)) > tolerance:
        raise BadSignature(f"{name} timestamp is outside the {tolerance / 60:g} minute tolerance")
    expected = _digest(secret, stamp, body)
    if not any(hmac.compare_digest(expected, candidate) for candidate in signatures):
        raise BadSignature(f"{name} does not match the body")


def shown_url(url: str) -> str:
    """`url` as history and logs may show it: scheme://host[:port]/path. Its query string and
    fragment may carry the receiver's own secret, so they are never shown."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "(invalid URL)"
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}{f':{port}' if port else ''}{parts.path or '/'}"


def receiver(url: str) -> str:
    """What one receiver is, for sharing out delivery slots: scheme, host and port."""
    try:
        parts = urlsplit(url)
        return f"{parts.scheme}://{(parts.hostname or '').lower()}:{parts.port or ''}"
    except ValueError:
        return url
