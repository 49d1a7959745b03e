"""Reading a CalDAV calendar, and only what changed since the last read.

Three ways, the cheapest the server offers:

- sync-token (RFC 6578): a `sync-collection` REPORT with the token of the last read answers only the
  resources added, changed or removed since; nothing changed is one small answer.
- ctag (CalendarServer's `getctag`): a Depth 0 PROPFIND tells whether anything changed; the whole
  calendar is read only when it did.
- neither: every poll reads the whole calendar (one `calendar-query` REPORT, RFC 4791 §7.8).

What a read keeps, for the next one: the feed's `etag` column holds the collection's version,
`sync-token:TOKEN` or `ctag:CTAG`, and its `body` the calendar's resources by href as JSON
(`{"resources": {href: iCalendar text}}`), so a delta can be applied to them. A body in another form
(kept by an older release, which stored the merged calendar) or no version means a full read.

Every request goes through `worker.adapters.outbound.request` like the rest of the feeds' reading (source.py);
XML is read by the standard library's parser (no external entities; bodies are bounded).
"""

from __future__ import annotations

import json
import logging
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit
from xml.sax.saxutils import escape

from config.settings import Settings
from worker.adapters.calendars import limits
from worker.adapters.outbound import Answer, OutboundFailed, OutboundRefused, request

log = logging.getLogger(__name__)

# Whether sync-collection is used when the server offers it (a test turns it off to try the ctag path
# on a server that offers both).
USE_SYNC_TOKEN = True
# A server may answer a delta in parts (507 on the collection: "ask again from this token").
MAX_SYNC_ROUNDS = 10

DAV = "{DAV:}"
CALDAV = "{urn:ietf:params:xml:ns:caldav}"
CTAG = "{http://calendarserver.org/ns/}getctag"

_PROPFIND = b"""<?xml version="1.0" encoding="utf-8" ?>
<D:propfind xmlns:D="DAV:" xmlns:CS="http://calendarserver.org/ns/">
  <D:prop><D:sync-token/><CS:getctag/></D:prop>
</D:propfind>
"""

# Every event of the calendar (RFC 4791 §7.8): one REPORT, Depth 1.
_QUERY = b"""<?xml version="1.0" encoding="utf-8" ?>
<C:calendar-query xmlns:D="DAV:" xmlns:C="urn:ietf:params:xml:ns:caldav">
  <D:prop><D:getetag/><C:calendar-data/></D:prop>
  <C:filter><C:comp-filter name="VCALENDAR"><C:comp-filter name="VEVENT"/></C:comp-filter></C:filter>
</C:calendar-query>
"""

_SYNC = """<?xml version="1.0" encoding="utf-8" ?>
<D:sync-collection xmlns:D="DAV:" xmlns:C="urn:ietf:params:xml:ns:caldav">
  <D:sync-token>{token}</D:sync-token>
  <D:sync-level>1</D:sync-level>
  <D:prop><D:getetag/><C:calendar-data/></D:prop>
</D:sync-collection>
"""


class CalDAVError(RuntimeError):
    """The calendar could not be read; the message is safe to show (no credential in it)."""


class _Unsupported(Exception):
    """The server does not answer this request the way a sync needs (try the next way)."""


@dataclass(frozen=True)
class Read:
    resources: dict[str, str]  # href -> iCalendar text
    version: str | None  # "sync-token:…", "ctag:…", or None
    modified: bool
    how: str  # for the poll's detail


@dataclass
class _Client:
    url: str
    settings: Settings
    auth: tuple[str, str] | None
    deadline: float

    def send(self, method: str, body: bytes, depth: str) -> Answer:
        try:
            answer = request(
                method,
                self.url,
                self.settings,
                deadline=self.deadline,
                max_bytes=limits.MAX_BODY_BYTES,
                headers={"Depth": depth, "Content-Type": "application/xml; charset=utf-8"},
                content=body,
                auth=self.auth,
                redirects=5,
            )
        except OutboundRefused as exc:
            log.warning("feed url refused by the outbound rules: %s", exc)
            raise CalDAVError(
                "url: refused by the outbound rules (https to a public host on an allowed port, or a "
                "host in ROOMKEEPER_OUTBOUND_ALLOWED_HOSTS)"
            ) from None
        except OutboundFailed as exc:
            raise CalDAVError(f"the CalDAV calendar could not be read: {exc}") from None
        if answer.status in (401, 403) and method == "PROPFIND":
            raise CalDAVError(f"the CalDAV server refused the credentials (HTTP {answer.status})")
        return answer


def _xml(answer: Answer) -> ElementTree.Element:
    try:
        # The standard library's parser expands no external entity and refuses entity bombs
        # (expat >= 2.4.1); the body is already bounded.
        return ElementTree.fromstring(answer.body)
    except ElementTree.ParseError:
        raise CalDAVError("the CalDAV calendar answered XML that does not parse") from None


def _code(status: ElementTree.Element | None) -> int | None:
    """The code of a `<D:status>HTTP/1.1 200 OK</D:status>`; None without one."""
    if status is None:
        return None
    parts = (status.text or "").split()
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


def _ok(status: ElementTree.Element | None) -> bool:
    code = _code(status)
    return code is None or 200 <= code < 300


def _href(element: ElementTree.Element) -> str | None:
    href = element.findtext(f"{DAV}href")
    return unquote(urlsplit(href.strip()).path) if href and href.strip() else None


def _members(root: ElementTree.Element) -> tuple[dict[str, str | None], bool]:
    """The multistatus' members: href -> calendar data (None: removed, 404), and whether the server
    said the answer is partial (507 on a response)."""
    found: dict[str, str | None] = {}
    partial = False
    for response in root.iter(f"{DAV}response"):
        href = _href(response)
        status = response.find(f"{DAV}status")
        if _code(status) == 507:
            partial = True
            continue
        if href is None or href.endswith("/"):
            continue  # the collection itself
        if status is not None and not _ok(status):
            found[href] = None
            continue
        data = None
        for propstat in response.iter(f"{DAV}propstat"):
            if _ok(propstat.find(f"{DAV}status")):
                data = propstat.findtext(f"{DAV}prop/{CALDAV}calendar-data") or data
        if data is None or not data.strip():
            raise _Unsupported(f"no calendar data for {href}")
        found[href] = data
    return found, partial


def _properties(client: _Client) -> dict[str, str]:
    """The collection's sync-token and ctag, those the server has (Depth 0 PROPFIND)."""
    answer = client.send("PROPFIND", _PROPFIND, "0")
    if answer.status != 207:
        return {}
    found: dict[str, str] = {}
    for propstat in _xml(answer).iter(f"{DAV}propstat"):
        if not _ok(propstat.find(f"{DAV}status")):
            continue
        for key, tag in (("sync-token", f"{DAV}sync-token"), ("ctag", CTAG)):
            value = (propstat.findtext(f"{DAV}prop/{tag}") or "").strip()
            if value:
                found[key] = value
    return found


def _sync(client: _Client, token: str) -> tuple[str, dict[str, str | None]]:
    """What changed since `token` ("" for everything): (the new token, href -> data or None)."""
    changes: dict[str, str | None] = {}
    for _round in range(MAX_SYNC_ROUNDS):
        answer = client.send("REPORT", _SYNC.format(token=escape(token)).encode(), "0")
        if answer.status != 207:
            # 403/409 valid-sync-token: the server forgot the token; others: no sync-collection.
            raise _Unsupported(f"sync-collection answered HTTP {answer.status}")
        root = _xml(answer)
        new_token = (root.findtext(f"{DAV}sync-token") or "").strip()
        if not new_token:
            raise _Unsupported("sync-collection answered without a sync-token")
        members, partial = _members(root)
        changes.update(members)
        token = new_token
        if not partial:
            return token, changes
    raise CalDAVError(f"the CalDAV server answered the changes in more than {MAX_SYNC_ROUNDS} parts")


def _query(client: _Client) -> dict[str, str]:
    answer = client.send("REPORT", _QUERY, "1")
    if answer.status in (401, 403):
        raise CalDAVError(f"the CalDAV server refused the credentials (HTTP {answer.status})")
    if answer.status != 207:
        raise CalDAVError(f"the CalDAV calendar answered HTTP {answer.status}, not 207 Multi-Status")
    try:
        members, _partial = _members(_xml(answer))
    except _Unsupported:
        raise CalDAVError("the CalDAV calendar answered an event without its data") from None
    return {href: data for href, data in members.items() if data is not None}


def load(version: str | None, body: str | None) -> tuple[str | None, dict[str, str] | None]:
    """What the last read kept: its version, and its resources (None unless in this module's form)."""
    if not version or not body or not body.startswith("{"):
        return None, None
    try:
        kept = json.loads(body)
    except ValueError:
        return None, None
    resources = kept.get("resources") if isinstance(kept, dict) else None
    if not isinstance(resources, dict) or not all(isinstance(v, str) for v in resources.values()):
        return None, None
    return version, resources


def dump(resources: dict[str, str]) -> str:
    return json.dumps({"resources": resources}, sort_keys=True)


def read(
    url: str,
    settings: Settings,
    auth: tuple[str, str] | None,
    *,
    deadline: float,
    version: str | None = None,
    body: str | None = None,
) -> Read:
    """The calendar's resources, read the cheapest way the server and the last read allow."""
    client = _Client(url, settings, auth, deadline)
    version, kept = load(version, body)
    kind, _, value = (version or "").partition(":")
    if kept is not None and kind == "sync-token" and USE_SYNC_TOKEN:
        try:
            token, changes = _sync(client, value)
        except _Unsupported as exc:
            log.info("feed CalDAV %s: %s; reading it whole", url, exc)
        else:
            if not changes:
                return Read(kept, f"sync-token:{token}", False, "not modified (sync-token)")
            resources = dict(kept)
            for href, data in changes.items():
                if data is None:
                    resources.pop(href, None)
                else:
                    resources[href] = data
            removed = sum(1 for data in changes.values() if data is None)
            how = f"{len(changes) - removed} changed and {removed} removed event(s) read (sync-token)"
            return Read(resources, f"sync-token:{token}", True, how)
    # The version is asked before the calendar is read: a change made in between is read again at
    # the next poll, never missed.
    properties = _properties(client)
    if properties.get("sync-token") and USE_SYNC_TOKEN:
        try:
            token, changes = _sync(client, "")
        except _Unsupported as exc:
            log.info("feed CalDAV %s: %s; using calendar-query", url, exc)
        else:
            resources = {href: data for href, data in changes.items() if data is not None}
            return Read(resources, f"sync-token:{token}", True, "downloaded (sync-token)")
    ctag = properties.get("ctag")
    if ctag is not None and kept is not None and kind == "ctag" and value == ctag:
        return Read(kept, version, False, "not modified (ctag)")
    resources = _query(client)
    if ctag is not None:
        return Read(resources, f"ctag:{ctag}", True, "downloaded (ctag changed)")
    return Read(resources, None, True, "downloaded (no ctag or sync-token)")
