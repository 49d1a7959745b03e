"""Reading a feed: an ICS URL with a conditional GET, or a CalDAV calendar through `caldav`.

Every URL passes the outbound rules (worker/outbound.py) before each request, a redirect's target
too (redirects are followed by hand, so none leads past them). Credentials are never put in a message.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import httpx

from config.settings import Settings
from worker.outbound import OutboundRefused, check_url

TIMEOUT_SECONDS = 30.0
MAX_BYTES = 20 * 1024 * 1024


class FetchError(RuntimeError):
    """The feed could not be read; the message is safe to show (no credential in it)."""


@dataclass(frozen=True)
class Fetched:
    text: str | None  # None: 304, the stored body still holds
    etag: str | None = None
    last_modified: str | None = None


MAX_REDIRECTS = 5


def fetch_ics(
    url: str, settings: Settings, *, etag: str | None = None, last_modified: str | None = None
) -> Fetched:
    """GET the feed; a 304 (to If-None-Match / If-Modified-Since) gives `Fetched(None)`. Redirects
    are followed by hand, at most MAX_REDIRECTS, each target checked by the outbound rules."""
    headers = {"Accept": "text/calendar, */*;q=0.5", "User-Agent": "roomkeeper-feeds"}
    if etag:
        headers["If-None-Match"] = etag
    if last_modified:
        headers["If-Modified-Since"] = last_modified
    try:
        with httpx.Client(timeout=TIMEOUT_SECONDS, follow_redirects=False, trust_env=False) as client:
            for _ in range(MAX_REDIRECTS + 1):
                try:
                    check_url(url, settings)
                except OutboundRefused as exc:
                    raise FetchError(f"url {exc}") from None
                with client.stream("GET", url, headers=headers) as response:
                    if response.is_redirect and "location" in response.headers:
                        url = str(response.url.join(response.headers["location"]))
                        continue
                    return _read(response, etag, last_modified)
            raise FetchError(f"the feed redirected more than {MAX_REDIRECTS} times")
    except httpx.TimeoutException:
        raise FetchError("the feed did not answer in time") from None
    except httpx.HTTPError as exc:
        raise FetchError(f"the feed could not be read: {type(exc).__name__}") from None


def _read(response: httpx.Response, etag: str | None, last_modified: str | None) -> Fetched:
    if response.status_code == 304 and (etag or last_modified):
        return Fetched(None, etag, last_modified)
    if not 200 <= response.status_code < 300:
        raise FetchError(f"the feed answered HTTP {response.status_code}")
    ctype = response.headers.get("content-type", "").lower()
    if "html" in ctype:
        raise FetchError(f"the feed answered {ctype.split(';')[0]}, not text/calendar")
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_bytes():
        size += len(chunk)
        if size > MAX_BYTES:
            raise FetchError(f"the feed is larger than {MAX_BYTES} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    return Fetched(
        raw.decode(response.encoding or "utf-8", errors="replace"),
        response.headers.get("etag"),
        response.headers.get("last-modified"),
    )


def fetch_caldav(
    url: str, settings: Settings, username: str | None, password_env: str | None, password: str | None = None
) -> Fetched:
    """All events of the CalDAV calendar at `url`, as one VCALENDAR text."""
    import caldav
    import icalendar

    try:
        check_url(url, settings)
    except OutboundRefused as exc:
        raise FetchError(f"url {exc}") from None
    if password_env:
        password = os.environ.get(password_env)
        if password is None:
            raise FetchError(f"the environment variable {password_env} (the CalDAV password) is not set")
    merged = icalendar.Calendar()
    merged.add("PRODID", "-//roomkeeper//feeds//EN")
    merged.add("VERSION", "2.0")
    seen_zones: set[str] = set()
    try:
        with caldav.DAVClient(
            url=url, username=username, password=password, timeout=int(TIMEOUT_SECONDS)
        ) as client:
            calendar = client.calendar(url=url)
            for item in calendar.events():
                parsed = icalendar.Calendar.from_ical(item.data)
                for component in parsed.subcomponents:
                    if component.name == "VTIMEZONE":
                        tzid = str(component.get("TZID"))
                        if tzid in seen_zones:
                            continue
                        seen_zones.add(tzid)
                    merged.add_component(component)
    except FetchError:
        raise
    except Exception as exc:  # caldav raises its own errors, requests', and others
        raise FetchError(f"the CalDAV calendar could not be read: {type(exc).__name__}") from None
    return Fetched(merged.to_ical().decode())
