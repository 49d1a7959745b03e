"""Reading a feed: an ICS URL with a conditional GET, or a CalDAV calendar with one REPORT.

Both go through `worker.outbound.request`, the same rules as every outbound request: each hop
checked (redirects followed by hand, each target checked), the connection made to the address that
was checked, no proxy from the environment, one total deadline, a bounded body. Messages are safe to
show to whoever reads the feed's status: no credential, and no detail of why a connection failed
(that would map the network behind the host); the detail goes to the log.
"""

from __future__ import annotations

import logging
import os
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass

from config.settings import Settings
from worker.feeds import limits
from worker.outbound import OutboundFailed, OutboundRefused, request

log = logging.getLogger(__name__)

TIMEOUT_SECONDS = 30.0
MAX_BYTES = limits.MAX_BODY_BYTES
MAX_REDIRECTS = 5


class FetchError(RuntimeError):
    """The feed could not be read; the message is safe to show (no credential in it)."""


@dataclass(frozen=True)
class Fetched:
    text: str | None  # None: 304, the stored body still holds
    etag: str | None = None
    last_modified: str | None = None


def _deadline(deadline: float | None) -> float:
    cap = time.monotonic() + TIMEOUT_SECONDS
    return cap if deadline is None else min(cap, deadline)


def _refused(exc: OutboundRefused) -> FetchError:
    log.warning("feed url refused by the outbound rules: %s", exc)
    return FetchError(
        "url: refused by the outbound rules (https to a public host on an allowed port, or a host "
        "in ROOMKEEPER_OUTBOUND_ALLOWED_HOSTS)"
    )


def fetch_ics(
    url: str,
    settings: Settings,
    *,
    etag: str | None = None,
    last_modified: str | None = None,
    deadline: float | None = None,
) -> Fetched:
    """GET the feed; a 304 (to If-None-Match / If-Modified-Since) gives `Fetched(None)`."""
    headers = {"Accept": "text/calendar, */*;q=0.5", "User-Agent": "roomkeeper-feeds"}
    if etag:
        headers["If-None-Match"] = etag
    if last_modified:
        headers["If-Modified-Since"] = last_modified
    try:
        answer = request(
            "GET",
            url,
            settings,
            deadline=_deadline(deadline),
            max_bytes=MAX_BYTES,
            headers=headers,
            redirects=MAX_REDIRECTS,
        )
    except OutboundRefused as exc:
        raise _refused(exc) from None
    except OutboundFailed as exc:
        raise FetchError(f"the feed could not be read: {exc}") from None
    if answer.status == 304 and (etag or last_modified):
        return Fetched(None, etag, last_modified)
    if not 200 <= answer.status < 300:
        raise FetchError(f"the feed answered HTTP {answer.status}")
    ctype = answer.headers.get("content-type", "").lower()
    if "html" in ctype:
        raise FetchError(f"the feed answered {ctype.split(';')[0]}, not text/calendar")
    encoding = _charset(ctype)
    return Fetched(
        answer.body.decode(encoding, errors="replace"),
        answer.headers.get("etag"),
        answer.headers.get("last-modified"),
    )


def _charset(ctype: str) -> str:
    for part in ctype.split(";")[1:]:
        key, _, value = part.strip().partition("=")
        if key == "charset" and value:
            try:
                "".encode(value.strip('"'))
                return value.strip('"')
            except LookupError:
                break
    return "utf-8"


# The CalDAV query for every event of the calendar (RFC 4791 §7.8): one REPORT, Depth 1.
_REPORT = b"""<?xml version="1.0" encoding="utf-8" ?>
<C:calendar-query xmlns:D="DAV:" xmlns:C="urn:ietf:params:xml:ns:caldav">
  <D:prop><C:calendar-data/></D:prop>
  <C:filter><C:comp-filter name="VCALENDAR"><C:comp-filter name="VEVENT"/></C:comp-filter></C:filter>
</C:calendar-query>
"""
_CALENDAR_DATA = "{urn:ietf:params:xml:ns:caldav}calendar-data"


def fetch_caldav(
    url: str,
    settings: Settings,
    username: str | None,
    password_env: str | None,
    password: str | None = None,
    *,
    deadline: float | None = None,
) -> Fetched:
    """All events of the CalDAV calendar at `url`, as one VCALENDAR text."""
    import icalendar

    if password_env:
        password = os.environ.get(password_env)
        if password is None:
            # Named in the log for the operator, not in the status: a caller must not learn which
            # variables the service has.
            log.warning("feed CalDAV password: the environment variable %s is not set", password_env)
            raise FetchError("the CalDAV credentials are not available (see the service's log)")
    auth = (username, password) if username is not None and password is not None else None
    try:
        answer = request(
            "REPORT",
            url,
            settings,
            deadline=_deadline(deadline),
            max_bytes=MAX_BYTES,
            headers={"Depth": "1", "Content-Type": "application/xml; charset=utf-8"},
            content=_REPORT,
            auth=auth,
            redirects=MAX_REDIRECTS,
        )
    except OutboundRefused as exc:
        raise _refused(exc) from None
    except OutboundFailed as exc:
        raise FetchError(f"the CalDAV calendar could not be read: {exc}") from None
    if answer.status in (401, 403):
        raise FetchError(f"the CalDAV server refused the credentials (HTTP {answer.status})")
    if answer.status != 207:
        raise FetchError(f"the CalDAV calendar answered HTTP {answer.status}, not 207 Multi-Status")
    try:
        # The standard library's parser expands no external entity and refuses entity bombs
        # (expat >= 2.4.1); the body is already bounded.
        root = ElementTree.fromstring(answer.body)
    except ElementTree.ParseError:
        raise FetchError("the CalDAV calendar answered XML that does not parse") from None
    merged = icalendar.Calendar()
    merged.add("PRODID", "-//roomkeeper//feeds//EN")
    merged.add("VERSION", "2.0")
    seen_zones: set[str] = set()
    for element in root.iter(_CALENDAR_DATA):
        if not element.text or not element.text.strip():
            continue
        try:
            parsed = icalendar.Calendar.from_ical(element.text)
        except Exception:  # icalendar raises ValueError and others on malformed input
            raise FetchError("the CalDAV calendar holds an event that does not parse") from None
        for component in parsed.subcomponents:
            if component.name == "VTIMEZONE":
                tzid = str(component.get("TZID"))
                if tzid in seen_zones:
                    continue
                seen_zones.add(tzid)
            merged.add_component(component)
    return Fetched(merged.to_ical().decode())
