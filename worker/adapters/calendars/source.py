"""Reading a feed: an ICS URL with a conditional GET, or a CalDAV calendar (`calendars/caldav.py`).

Both go through `worker.adapters.outbound.request`, the same rules as every outbound request: each hop
checked (redirects followed by hand, each target checked), the connection made to the address that
was checked, no proxy from the environment, one total deadline, a bounded body. Messages are safe to
show to whoever reads the feed's status: no credential, and no detail of why a connection failed
(that would map the network behind the host); the detail goes to the log.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass

from config.settings import Settings
from worker.adapters.calendars import caldav, limits
from worker.adapters.outbound import Answer, OutboundFailed, OutboundRefused, request

log = logging.getLogger(__name__)

TIMEOUT_SECONDS = 30.0
MAX_BYTES = limits.MAX_BODY_BYTES
MAX_REDIRECTS = 5


class FetchError(RuntimeError):
    """The feed could not be read; the message is safe to show (no credential in it)."""


@dataclass(frozen=True)
class Fetched:
    text: str | None  # the calendar; None: 304, the stored body still holds
    etag: str | None = None  # ICS: the ETag; CalDAV: the collection's version (caldav.py)
    last_modified: str | None = None
    keep: str | None = None  # the body to store when it is not `text` (a CalDAV calendar's resources)
    modified: bool = True  # False: the source says nothing changed (304, same ctag or sync-token)
    how: str = "downloaded"  # how it was read, for the poll's detail
    max_age: int | None = None  # ICS: Cache-Control max-age, seconds (None: none, or no-cache/no-store)


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
        return Fetched(
            None, etag, last_modified, modified=False, how="not modified (304)", max_age=max_age(answer)
        )
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
        max_age=max_age(answer),
    )


def max_age(answer: Answer) -> int | None:
    """The answer's Cache-Control max-age in seconds; None without one, or with no-cache / no-store
    (which ask for the normal interval)."""
    directives = {}
    for part in answer.headers.get_list("cache-control", split_commas=True):
        key, _, value = part.strip().partition("=")
        directives[key.strip().lower()] = value.strip().strip('"')
    if "no-cache" in directives or "no-store" in directives:
        return None
    value = directives.get("max-age", "")
    return int(value) if value.isdigit() else None


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


def fetch_caldav(
    url: str,
    settings: Settings,
    username: str | None,
    password_env: str | None,
    password: str | None = None,
    *,
    deadline: float | None = None,
    version: str | None = None,
    body: str | None = None,
) -> Fetched:
    """The events of the CalDAV calendar at `url`, as one VCALENDAR text, read only as far as it
    changed since the read that kept `version` and `body` (worker/adapters/calendars/caldav.py)."""
    if password_env:
        password = os.environ.get(password_env)
        if password is None:
            # Named in the log for the operator, not in the status: a caller must not learn which
            # variables the service has.
            log.warning("feed CalDAV password: the environment variable %s is not set", password_env)
            raise FetchError("the CalDAV credentials are not available (see the service's log)")
    auth = (username, password) if username is not None and password is not None else None
    try:
        got = caldav.read(url, settings, auth, deadline=_deadline(deadline), version=version, body=body)
    except caldav.CalDAVError as exc:
        raise FetchError(str(exc)) from None
    text = merge(got.resources.values())
    if len(text) > MAX_BYTES:
        raise FetchError(f"the CalDAV calendar is larger than {MAX_BYTES} bytes")
    return Fetched(
        text,
        got.version,
        keep=caldav.dump(got.resources) if got.modified else None,
        modified=got.modified,
        how=got.how,
    )


def merge(resources: Iterable[str]) -> str:
    """One VCALENDAR of the events of every resource (each zone once; to-dos and journals left out)."""
    import icalendar

    merged = icalendar.Calendar()
    merged.add("PRODID", "-//roomkeeper//feeds//EN")
    merged.add("VERSION", "2.0")
    seen_zones: set[str] = set()
    for resource in resources:
        try:
            parsed = icalendar.Calendar.from_ical(resource)
        except Exception:  # icalendar raises ValueError and others on malformed input
            raise FetchError("the CalDAV calendar holds an event that does not parse") from None
        components = list(parsed.subcomponents)
        if not any(component.name == "VEVENT" for component in components):
            continue
        for component in components:
            if component.name == "VTIMEZONE":
                tzid = str(component.get("TZID"))
                if tzid in seen_zones:
                    continue
                seen_zones.add(tzid)
            elif component.name != "VEVENT":
                continue
            merged.add_component(component)
    return merged.to_ical().decode()
