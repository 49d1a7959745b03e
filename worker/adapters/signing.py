"""Signatures of the events POSTed to notify URLs (CONTRACT §4.4), the way Stripe and Whereby sign.

`Roomkeeper-Signature: t=UNIX,v1=HEX`, HEX being HMAC-SHA256 over `"{t}.{raw body}"` with
ROOMKEEPER_NOTIFY_SIGNING_SECRET. The timestamp is signed too, so a receiver can refuse old replays.
"""

from __future__ import annotations

import hashlib
import hmac
from urllib.parse import urlsplit


def signature(secret: str, body: bytes, timestamp: int) -> str:
    """The Roomkeeper-Signature header's value for `body` sent at `timestamp`."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


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
