"""In-memory stand-in for Whereby's /v1/meetings API, served over real HTTP for the demo, tests and bench."""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.utils
import heapq
import hmac
import json
import math
import random
import re
import secrets
import socket
import threading
import time
import urllib.request
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from types import TracebackType
from typing import Any, Self

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

__all__ = [
    "Sandbox",
    "SandboxAdmin",
    "SandboxConfig",
    "SandboxServer",
    "create_app",
    "serve",
]

# Whereby's documented price list: read 1, delete 2, write 3.
POINTS = {"GET": 1, "DELETE": 2, "POST": 3}
WINDOW_SECONDS = 60.0
# Whereby and the caller never share a clock; a create racing its own endDate must not fail.
CLOCK_SLACK_SECONDS = 1.0
EXTRA_FIELDS = ("hostRoomUrl", "viewerRoomUrl")
HUMAN_SHORT_ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"
PREFIX_RE = re.compile(r"[a-z0-9-]{0,39}")
THROTTLE_MESSAGE = "Rate limit active for throttle key: organization:1"
# An unlimited sandbox has no budget to report; clients still parse the header, so give them the
# Build plan's figure rather than a 0 that reads as "no budget at all".
NOMINAL_LIMIT = 100
INJECTED_ERROR_STATUSES = (500, 502, 503)
SCRIPT_METHODS = ("GET", "POST", "DELETE", "*")
SCRIPT_ACTIONS = ("error", "lost_reply", "rate_limit")
# The stall fault keeps a request open for stall_seconds; stopping must not wait that long.
GRACEFUL_SHUTDOWN_SECONDS = 1


@dataclass
class SandboxConfig:
    api_key: str = "sandbox-key"
    points_per_minute: int = 0
    latency_ms: float = 0.0
    error_rate: float = 0.0
    lost_reply_rate: float = 0.0
    lost_reply_mode: str = "error"
    stall_seconds: float = 30.0
    expiry_seconds: float = 86400.0
    delete_unknown_status: int = 204
    public_url: str = "https://sandbox.whereby.invalid"
    seed: int | None = None


# The knobs /_sandbox/faults may turn; api_key, public_url and seed are fixed for a sandbox's life.
TUNABLE = (
    "latency_ms",
    "error_rate",
    "lost_reply_rate",
    "lost_reply_mode",
    "stall_seconds",
    "points_per_minute",
    "expiry_seconds",
    "delete_unknown_status",
)


class BadRequest(ValueError):
    """A request the sandbox refuses; the message is "<field>: <rule>"."""


def _number(name: str, value: Any, low: float, high: float | None = None) -> float:
    # bool is an int to Python but never a number to a JSON client.
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise BadRequest(f"{name}: must be a number")
    if value < low or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f"at least {low}"
        raise BadRequest(f"{name}: must be {bound}")
    return float(value)


def _integer(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{name}: must be an integer")
    if value < low:
        raise BadRequest(f"{name}: must be at least {low}")
    return value


def _check_setting(name: str, value: Any) -> Any:
    """Validates one tunable config value and returns it in its stored type."""
    if name in ("latency_ms", "stall_seconds", "expiry_seconds"):
        return _number(name, value, 0)
    if name in ("error_rate", "lost_reply_rate"):
        return _number(name, value, 0, 1)
    if name == "points_per_minute":
        return _integer(name, value, 0)
    if name == "lost_reply_mode":
        if value not in ("error", "stall"):
            raise BadRequest(f"{name}: must be error or stall")
        return value
    if name == "delete_unknown_status":
        if isinstance(value, bool) or value not in (204, 404):
            raise BadRequest(f"{name}: must be 204 or 404")
        return value
    raise BadRequest(f"{name}: unknown setting")


def _check_step(step: Any) -> dict[str, Any]:
    """Validates one scripted fault and fills in its defaults."""
    if not isinstance(step, dict):
        raise BadRequest("script: each step must be an object")
    unknown = set(step) - {"method", "action", "status", "retry_after", "mode"}
    if unknown:
        raise BadRequest(f"script: unknown step key {min(unknown)}")
    method = str(step.get("method", "*")).upper()
    if method not in SCRIPT_METHODS:
        raise BadRequest("script: method must be GET, POST, DELETE or *")
    action = step.get("action")
    if action not in SCRIPT_ACTIONS:
        raise BadRequest("script: action must be error, lost_reply or rate_limit")
    checked: dict[str, Any] = {"method": method, "action": action}
    if action == "error":
        status = step.get("status", 503)
        if isinstance(status, bool) or not isinstance(status, int) or not 400 <= status <= 599:
            raise BadRequest("script: status must be an integer from 400 to 599")
        checked["status"] = status
    elif action == "lost_reply":
        mode = step.get("mode")
        if mode not in (None, "error", "stall"):
            raise BadRequest("script: mode must be error or stall")
        checked["mode"] = mode
    else:
        checked["retry_after"] = _number("script: retry_after", step.get("retry_after", 1), 0)
    return checked


def _iso(moment: datetime) -> str:
    # Whereby answers in UTC with millisecond precision and a Z.
    utc = moment.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def _iso_ts(ts: float) -> str:
    return _iso(datetime.fromtimestamp(ts, UTC))


def _parse_instant(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    text = value.strip()
    if text[-1:] in ("z", "Z"):
        text = text[:-1] + "+00:00"
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    # Whereby reads an endDate without an offset as UTC, not as its own local time.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _encode_cursor(meeting_id: int) -> str:
    return base64.urlsafe_b64encode(f"after:{meeting_id}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> int:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise BadRequest("cursor: invalid") from None
    kind, _, number = text.partition(":")
    if kind != "after" or not number.isdigit():
        raise BadRequest("cursor: invalid")
    return int(number)


@dataclass
class _Room:
    meeting_id: str
    room_name: str
    room_url: str
    created_at: float
    end: datetime
    room_mode: str
    is_locked: bool
    host_key: str
    viewer_key: str
    deleted_at: float | None = None
    deleted_by: str | None = None

    @property
    def live(self) -> bool:
        return self.deleted_at is None

    def meeting(self, extra: Iterable[str]) -> dict[str, Any]:
        body: dict[str, Any] = {
            "meetingId": self.meeting_id,
            "roomName": self.room_name,
            "roomUrl": self.room_url,
            "startDate": _iso_ts(self.created_at),
            "endDate": _iso(self.end),
        }
        wanted = set(extra)
        if "hostRoomUrl" in wanted:
            body["hostRoomUrl"] = f"{self.room_url}?roomKey={self.host_key}"
        if "viewerRoomUrl" in wanted:
            body["viewerRoomUrl"] = f"{self.room_url}?roomKey={self.viewer_key}"
        return body

    def record(self) -> dict[str, Any]:
        return {
            "meeting_id": self.meeting_id,
            "room_name": self.room_name,
            "room_url": self.room_url,
            "end_date": _iso(self.end),
            "created_at": _iso_ts(self.created_at),
            "deleted_at": None if self.deleted_at is None else _iso_ts(self.deleted_at),
            "deleted_by": self.deleted_by,
            "live": self.live,
            "room_mode": self.room_mode,
            "is_locked": self.is_locked,
        }


@dataclass
class Reply:
    """What the HTTP layer sends back; stall is a delay before sending it."""

    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    stall: float = 0.0


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, {"error": message}, headers or {})


class Sandbox:
    """The state behind the fake API: rooms, call log, point budget and faults.

    Every method takes the lock, so the HTTP thread, tests and the benchmark may share one
    instance. ``clock`` is swappable so tests can slide the budget window and expire rooms
    without sleeping.
    """

    def __init__(
        self,
        config: SandboxConfig | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.config = config if config is not None else SandboxConfig()
        for name in TUNABLE:
            setattr(self.config, name, _check_setting(name, getattr(self.config, name)))
        self.clock = clock
        self._lock = threading.Lock()
        self._rng = random.Random(self.config.seed)
        # Ids keep counting across reset so a client holding a stale id never finds another room.
        self._next_id = 1
        self._rooms: dict[str, _Room] = {}
        self._names: set[str] = set()
        # Insertion order is meetingId order, which is the order the list endpoint pages in.
        self._live: dict[str, _Room] = {}
        # Expiry order is endDate order whatever expiry_seconds is, so one heap serves every setting.
        self._by_end: list[tuple[float, int, str]] = []
        self._spent: deque[tuple[float, int]] = deque()
        self._script: list[dict[str, Any]] = []
        self._calls: list[dict[str, Any]] = []
        self._seq = 0

    # ---- the /v1 API -------------------------------------------------------------------------

    def handle(
        self,
        method: str,
        path: str,
        query: Iterable[tuple[str, str]],
        authorization: str | None,
        body: bytes,
    ) -> Reply:
        """Answers one /v1 call and logs it; pure state, no I/O, so it is testable without HTTP."""
        with self._lock:
            now = self.clock()
            self._expire(now)
            entry: dict[str, Any] = {
                "points": 0,
                "meeting_id": None,
                "room_name": None,
                "fault": None,
            }
            reply = self._dispatch(now, method.upper(), path, list(query), authorization, body, entry)
            self._seq += 1
            self._calls.append(
                {
                    "seq": self._seq,
                    "at": _iso_ts(now),
                    "method": method.upper(),
                    "path": path,
                    "status": reply.status,
                    **entry,
                }
            )
            return reply

    def _authorized(self, authorization: str | None) -> bool:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        return hmac.compare_digest(token.strip().encode(), self.config.api_key.encode())

    def _dispatch(
        self,
        now: float,
        method: str,
        path: str,
        query: list[tuple[str, str]],
        authorization: str | None,
        body: bytes,
        entry: dict[str, Any],
    ) -> Reply:
        if not self._authorized(authorization):
            return _error(
                401,
                "Unauthorized: missing or invalid API key",
                {"WWW-Authenticate": "Bearer"},
            )

        parts = path.strip("/").split("/")
        if parts[:2] != ["v1", "meetings"] or len(parts) > 3:
            return _error(404, "Not Found")
        meeting_id = parts[2] if len(parts) == 3 else None
        allowed = ("GET", "DELETE") if meeting_id is not None else ("GET", "POST")
        if method not in allowed:
            return _error(405, "Method Not Allowed", {"Allow": ", ".join(allowed)})
        entry["meeting_id"] = meeting_id
        room = self._rooms.get(meeting_id) if meeting_id is not None else None
        if room is not None:
            entry["room_name"] = room.room_name

        cost = POINTS[method]
        throttled = self._throttle(now, cost)
        if throttled is not None:
            return throttled

        step = self._take_step(method)
        if step is not None and step["action"] == "rate_limit":
            entry["fault"] = "rate_limit"
            return self._too_many(now, step["retry_after"], remaining=0)

        # Conservative: a call Whereby admitted costs its points even when it then fails.
        self._spent.append((now, cost))
        entry["points"] = cost

        lost_mode: str | None = None
        if step is not None and step["action"] == "error":
            entry["fault"] = f"error:{step['status']}"
            return self._with_budget(now, _error(step["status"], HTTPStatus(step["status"]).phrase))
        if step is not None and step["action"] == "lost_reply":
            lost_mode = step["mode"] or self.config.lost_reply_mode
        elif step is None:
            if self.config.error_rate > 0 and self._rng.random() < self.config.error_rate:
                status = self._rng.choice(INJECTED_ERROR_STATUSES)
                entry["fault"] = f"error:{status}"
                return self._with_budget(now, _error(status, HTTPStatus(status).phrase))
            if (
                method == "POST"
                and self.config.lost_reply_rate > 0
                and self._rng.random() < self.config.lost_reply_rate
            ):
                lost_mode = self.config.lost_reply_mode

        try:
            if method == "POST":
                reply = self._create(now, body, entry)
            elif method == "DELETE":
                assert meeting_id is not None
                reply = self._delete(now, meeting_id)
            elif meeting_id is not None:
                reply = self._get(meeting_id, query)
            else:
                reply = self._list(query)
        except BadRequest as exc:
            reply = _error(400, str(exc))

        if lost_mode is not None:
            # The work is done; only the answer goes missing, as when a proxy times out.
            entry["fault"] = f"lost_reply:{lost_mode}"
            stall = self.config.stall_seconds if lost_mode == "stall" else 0.0
            return Reply(504, {"error": HTTPStatus(504).phrase}, stall=stall)
        return self._with_budget(now, reply)

    def _create(self, now: float, raw: bytes, entry: dict[str, Any]) -> Reply:
        try:
            body = json.loads(raw)
        except ValueError:
            raise BadRequest("body: must be a JSON object") from None
        if not isinstance(body, dict):
            raise BadRequest("body: must be a JSON object")

        if body.get("endDate") is None:
            raise BadRequest("endDate: required")
        end = _parse_instant(body["endDate"])
        if end is None:
            raise BadRequest("endDate: must be an ISO-8601 date-time")
        if end.timestamp() < now - CLOCK_SLACK_SECONDS:
            raise BadRequest("endDate: must not be in the past")

        prefix = body.get("roomNamePrefix", "")
        if not isinstance(prefix, str):
            raise BadRequest("roomNamePrefix: must be a string")
        prefix = "".join(prefix.lower().split())
        if not PREFIX_RE.fullmatch(prefix):
            raise BadRequest("roomNamePrefix: must match ^[a-z0-9-]{0,39}$")

        pattern = body.get("roomNamePattern", "uuid")
        if pattern not in ("uuid", "human-short"):
            raise BadRequest("roomNamePattern: must be uuid or human-short")
        mode = body.get("roomMode", "normal")
        if mode not in ("normal", "group"):
            raise BadRequest("roomMode: must be normal or group")
        locked = body.get("isLocked", False)
        if not isinstance(locked, bool):
            raise BadRequest("isLocked: must be a boolean")
        extra = body.get("fields", [])
        if not isinstance(extra, list) or any(item not in EXTRA_FIELDS for item in extra):
            raise BadRequest("fields: must be a list of hostRoomUrl, viewerRoomUrl")
        template = body.get("templateType")
        if template is not None and template != "viewerMode":
            raise BadRequest("templateType: must be viewerMode")
        if template == "viewerMode":
            mode, locked, extra = "group", True, list(EXTRA_FIELDS)

        meeting_id = str(self._next_id)
        self._next_id += 1
        name = self._new_name(prefix, pattern)
        room = _Room(
            meeting_id=meeting_id,
            room_name=name,
            room_url=self.config.public_url.rstrip("/") + name,
            created_at=now,
            end=end.astimezone(UTC),
            room_mode=mode,
            is_locked=locked,
            host_key=secrets.token_urlsafe(24),
            viewer_key=secrets.token_urlsafe(24),
        )
        self._rooms[meeting_id] = room
        self._live[meeting_id] = room
        heapq.heappush(self._by_end, (end.timestamp(), int(meeting_id), meeting_id))
        entry["meeting_id"] = meeting_id
        entry["room_name"] = name
        return Reply(201, room.meeting(extra))

    def _new_name(self, prefix: str, pattern: str) -> str:
        while True:
            if pattern == "uuid":
                tail = str(uuid.uuid4())
            else:
                tail = "".join(secrets.choice(HUMAN_SHORT_ALPHABET) for _ in range(6))
            name = f"/{prefix}{tail}"
            # Whereby's room names are unique forever; six characters can collide, so retry.
            if name not in self._names:
                self._names.add(name)
                return name

    def _get(self, meeting_id: str, query: list[tuple[str, str]]) -> Reply:
        extra = _query_fields(query)
        room = self._live.get(meeting_id)
        if room is None:
            return _error(404, "Not Found")
        return Reply(200, room.meeting(extra))

    def _list(self, query: list[tuple[str, str]]) -> Reply:
        params = dict(query)
        extra = _query_fields(query)
        raw_limit = params.get("limit", "50")
        if not raw_limit.strip().isdigit() or not 1 <= int(raw_limit) <= 100:
            raise BadRequest("limit: must be an integer from 1 to 100")
        limit = int(raw_limit)
        after = _decode_cursor(params["cursor"]) if params.get("cursor") else 0
        starts = params.get("roomName[startsWith]", "")

        page: list[_Room] = []
        more = False
        for room in self._live.values():
            if int(room.meeting_id) <= after or not room.room_name.startswith(starts):
                continue
            if len(page) == limit:
                more = True
                break
            page.append(room)
        cursor = _encode_cursor(int(page[-1].meeting_id)) if more else None
        return Reply(200, {"results": [room.meeting(extra) for room in page], "cursor": cursor})

    def _delete(self, now: float, meeting_id: str) -> Reply:
        room = self._rooms.get(meeting_id)
        if room is None:
            status = self.config.delete_unknown_status
            return Reply(204) if status == 204 else _error(status, "Not Found")
        if room.live:
            self._mark_deleted(room, now, "api")
        return Reply(204)

    # ---- budget and faults -------------------------------------------------------------------

    def _used(self, now: float) -> int:
        while self._spent and self._spent[0][0] <= now - WINDOW_SECONDS:
            self._spent.popleft()
        return sum(points for _, points in self._spent)

    def _throttle(self, now: float, cost: int) -> Reply | None:
        limit = self.config.points_per_minute
        used = self._used(now)
        if limit <= 0 or used + cost <= limit:
            return None
        # A call dearer than the whole budget never fits; tell the client to wait a full window.
        wait = WINDOW_SECONDS
        if cost <= limit:
            need, freed = used + cost - limit, 0
            for at, points in self._spent:
                freed += points
                if freed >= need:
                    wait = at + WINDOW_SECONDS - now
                    break
        return self._too_many(now, wait, remaining=max(0, limit - used))

    def _too_many(self, now: float, wait: float, remaining: int) -> Reply:
        limit = self.config.points_per_minute or NOMINAL_LIMIT
        return Reply(
            429,
            {"error": THROTTLE_MESSAGE, "data": {"msLeft": math.ceil(wait * 1000)}},
            {
                "Retry-After": str(max(1, math.ceil(wait))),
                "X-RateLimit-Limit": str(limit),
                "X-RateLimit-Remaining": str(remaining),
                "X-RateLimit-Reset": email.utils.formatdate(math.ceil(now + wait), usegmt=True),
            },
        )

    def _with_budget(self, now: float, reply: Reply) -> Reply:
        limit = self.config.points_per_minute
        if limit > 0:
            reply.headers["X-RateLimit-Limit"] = str(limit)
            reply.headers["X-RateLimit-Remaining"] = str(max(0, limit - self._used(now)))
        return reply

    def _take_step(self, method: str) -> dict[str, Any] | None:
        for index, step in enumerate(self._script):
            if step["method"] in (method, "*"):
                return self._script.pop(index)
        return None

    # ---- lifecycle ---------------------------------------------------------------------------

    def _mark_deleted(self, room: _Room, at: float, by: str) -> None:
        room.deleted_at = at
        room.deleted_by = by
        self._live.pop(room.meeting_id, None)

    def _expire(self, now: float) -> None:
        grace = self.config.expiry_seconds
        while self._by_end and self._by_end[0][0] + grace <= now:
            end_ts, _, meeting_id = heapq.heappop(self._by_end)
            room = self._live.get(meeting_id)
            if room is not None:
                # Stamp the moment Whereby would have deleted it, not the moment we noticed.
                self._mark_deleted(room, end_ts + grace, "expiry")

    # ---- admin -------------------------------------------------------------------------------

    def rooms(self, include_deleted: bool = True) -> list[dict[str, Any]]:
        with self._lock:
            self._expire(self.clock())
            return [room.record() for room in self._rooms.values() if include_deleted or room.live]

    def calls(self, since: int = 0) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(call) for call in self._calls if call["seq"] > since]

    def settings(self) -> dict[str, Any]:
        """The current config without the api_key, plus the pending script."""
        with self._lock:
            return self._settings()

    def _settings(self) -> dict[str, Any]:
        view = {key: value for key, value in asdict(self.config).items() if key != "api_key"}
        view["script"] = [dict(step) for step in self._script]
        return view

    def update(self, changes: Mapping[str, Any]) -> dict[str, Any]:
        """Applies a partial config update and appends script steps, all or nothing."""
        checked: dict[str, Any] = {}
        steps: list[dict[str, Any]] = []
        for key, value in changes.items():
            if key == "script":
                if not isinstance(value, list):
                    raise BadRequest("script: must be a list of steps")
                steps = [_check_step(step) for step in value]
            elif key in TUNABLE:
                checked[key] = _check_setting(key, value)
            else:
                raise BadRequest(f"{key}: unknown setting")
        with self._lock:
            for key, value in checked.items():
                setattr(self.config, key, value)
            self._script.extend(steps)
            return self._settings()

    def script(self, *steps: Mapping[str, Any]) -> None:
        self.update({"script": [dict(step) for step in steps]})

    def spend(self, points: int) -> None:
        """Points spent by another app of the same organisation: they count, over budget or not."""
        checked = _integer("points", points, 1)
        with self._lock:
            self._spent.append((self.clock(), checked))

    def delete_out_of_band(self, meeting_id: str) -> bool:
        """Deletes a room behind the client's back; False when the id was never seen."""
        with self._lock:
            now = self.clock()
            self._expire(now)
            room = self._rooms.get(meeting_id)
            if room is None:
                return False
            if room.live:
                self._mark_deleted(room, now, "out_of_band")
            return True

    def reset(self) -> None:
        with self._lock:
            self._rooms.clear()
            self._live.clear()
            self._names.clear()
            self._by_end.clear()
            self._spent.clear()
            self._script.clear()
            self._calls.clear()
            self._seq = 0
            # A seeded run after a reset replays the same faults as a fresh sandbox would.
            self._rng = random.Random(self.config.seed)


def _query_fields(query: list[tuple[str, str]]) -> list[str]:
    wanted = [item.strip() for key, value in query if key == "fields" for item in value.split(",")]
    wanted = [item for item in wanted if item]
    if any(item not in EXTRA_FIELDS for item in wanted):
        raise BadRequest("fields: must be a comma-separated list of hostRoomUrl, viewerRoomUrl")
    return wanted


# ---- HTTP layer ------------------------------------------------------------------------------


def _response(reply: Reply) -> Response:
    if reply.body is None:
        return Response(status_code=reply.status, headers=reply.headers)
    return JSONResponse(reply.body, status_code=reply.status, headers=reply.headers)


def _sandbox(request: Request) -> Sandbox:
    sandbox: Sandbox = request.app.state.sandbox
    return sandbox


async def _v1(request: Request) -> Response:
    sandbox = _sandbox(request)
    # asyncio.sleep, not time.sleep: slow answers must not stop the server answering others.
    if sandbox.config.latency_ms > 0:
        await asyncio.sleep(sandbox.config.latency_ms / 1000)
    reply = sandbox.handle(
        request.method,
        request.url.path,
        request.query_params.multi_items(),
        request.headers.get("authorization"),
        await request.body(),
    )
    if reply.stall > 0:
        await asyncio.sleep(reply.stall)
    return _response(reply)


async def _json_object(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError:
        raise BadRequest("body: must be a JSON object") from None
    if not isinstance(body, dict):
        raise BadRequest("body: must be a JSON object")
    return body


async def _health(request: Request) -> Response:
    return JSONResponse({"ok": True})


async def _admin_rooms(request: Request) -> Response:
    flag = request.query_params.get("include_deleted", "1").strip().lower()
    include = flag not in ("0", "false", "no", "off")
    return JSONResponse(_sandbox(request).rooms(include_deleted=include))


async def _admin_calls(request: Request) -> Response:
    since = request.query_params.get("since", "0")
    if not since.isdigit():
        return JSONResponse({"error": "since: must be a non-negative integer"}, status_code=400)
    return JSONResponse(_sandbox(request).calls(int(since)))


async def _admin_faults(request: Request) -> Response:
    sandbox = _sandbox(request)
    if request.method == "GET":
        return JSONResponse(sandbox.settings())
    try:
        return JSONResponse(sandbox.update(await _json_object(request)))
    except BadRequest as exc:
        return JSONResponse({"error": str(exc)}, status_code=400)


async def _admin_spend(request: Request) -> Response:
    try:
        body = await _json_object(request)
        points: Any = body.get("points")
        _sandbox(request).spend(points)
    except BadRequest as exc:
        return JSONResponse({"error": str(exc)}, status_code=400)
    return JSONResponse({"ok": True})


async def _admin_delete(request: Request) -> Response:
    if _sandbox(request).delete_out_of_band(request.path_params["meeting_id"]):
        return Response(status_code=204)
    return JSONResponse({"error": "Not Found"}, status_code=404)


async def _admin_reset(request: Request) -> Response:
    _sandbox(request).reset()
    return JSONResponse({"ok": True})


def create_app(config: SandboxConfig | None = None) -> Starlette:
    """The ASGI app; ``app.state.sandbox`` is its Sandbox."""
    app = Starlette(
        routes=[
            Route(
                "/v1/{rest:path}",
                _v1,
                methods=["GET", "POST", "DELETE", "PUT", "PATCH"],
            ),
            Route("/_sandbox/health", _health, methods=["GET"]),
            Route("/_sandbox/rooms", _admin_rooms, methods=["GET"]),
            Route("/_sandbox/rooms/{meeting_id}", _admin_delete, methods=["DELETE"]),
            Route("/_sandbox/calls", _admin_calls, methods=["GET"]),
            Route("/_sandbox/faults", _admin_faults, methods=["GET", "POST"]),
            Route("/_sandbox/spend", _admin_spend, methods=["POST"]),
            Route("/_sandbox/reset", _admin_reset, methods=["POST"]),
        ]
    )
    app.state.sandbox = Sandbox(config)
    return app


def _base(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _answers(url: str) -> bool:
    # urllib, not httpx: an httpx client loads a TLS context this plain-HTTP probe never uses.
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            return bool(response.status == 200)
    except OSError:
        return False


class SandboxServer:
    """Runs the app with uvicorn in a background thread on 127.0.0.1 and a free port (for tests/bench)."""

    def __init__(
        self,
        config: SandboxConfig | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ):
        self.app = create_app(config)
        self.sandbox: Sandbox = self.app.state.sandbox
        self.host = host
        self.port = port
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return self._origin() + "/v1"

    @property
    def admin_url(self) -> str:
        return self._origin() + "/_sandbox"

    def _origin(self) -> str:
        if not self.port:
            raise RuntimeError("the sandbox has no port until start()")
        return _base(self.host, self.port)

    def start(self, timeout: float = 10.0) -> SandboxServer:
        if self._thread is not None:
            raise RuntimeError("the sandbox server is already running")
        # Binding here, not in uvicorn, tells us the free port before anyone asks for the URL.
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        # IPPROTO_TCP, not 0: asyncio only sets TCP_NODELAY on sockets that say they are TCP,
        # and without it every small reply waits ~40 ms for a delayed ACK.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        server = uvicorn.Server(
            uvicorn.Config(
                self.app,
                log_level="warning",
                access_log=False,
                lifespan="off",
                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
            )
        )
        thread = threading.Thread(
            target=server.run,
            kwargs={"sockets": [sock]},
            name="whereby-sandbox",
            daemon=True,
        )
        self._server, self._thread = server, thread
        thread.start()
        deadline = time.monotonic() + timeout
        while True:
            if not thread.is_alive():
                sock.close()
                self._server = self._thread = None
                raise RuntimeError("the sandbox server failed to start")
            if server.started and _answers(self.admin_url + "/health"):
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the sandbox server did not answer in time")
            time.sleep(0.01)

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.should_exit = True
        thread.join(timeout=GRACEFUL_SHUTDOWN_SECONDS + 2)
        if thread.is_alive():
            server.force_exit = True
            thread.join(timeout=2)
        self._server = self._thread = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def serve(config: SandboxConfig, host: str, port: int) -> None:
    """Serves the sandbox in the foreground until SIGINT/SIGTERM (uvicorn shuts down gracefully)."""
    uvicorn.run(
        create_app(config),
        host=host,
        port=port,
        log_level="info",
        # The sandbox keeps its own call log; uvicorn's access log would only duplicate it.
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
    )


class SandboxAdmin:
    """Client for /_sandbox, for tests, the demo and the benchmark in other processes."""

    def __init__(self, admin_url: str, timeout: float = 10.0):
        self._client = httpx.Client(base_url=admin_url.rstrip("/") + "/", timeout=timeout)

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = self._client.request(method, path, **kwargs)
        if response.is_error:
            try:
                detail = response.json().get("error", response.text)
            except ValueError:
                detail = response.text
            raise RuntimeError(f"sandbox admin {method} {path}: {response.status_code} {detail}")
        return response

    def health(self) -> bool:
        ok: bool = self._call("GET", "health").json().get("ok") is True
        return ok

    def rooms(self, include_deleted: bool = True) -> list[dict[str, Any]]:
        rooms: list[dict[str, Any]] = self._call(
            "GET", "rooms", params={"include_deleted": "1" if include_deleted else "0"}
        ).json()
        return rooms

    def calls(self, since: int = 0) -> list[dict[str, Any]]:
        calls: list[dict[str, Any]] = self._call("GET", "calls", params={"since": since}).json()
        return calls

    def set_faults(self, **changes: Any) -> dict[str, Any]:
        config: dict[str, Any] = self._call("POST", "faults", json=changes).json()
        return config

    def script(self, *steps: dict[str, Any]) -> None:
        self._call("POST", "faults", json={"script": list(steps)})

    def spend(self, points: int) -> None:
        self._call("POST", "spend", json={"points": points})

    def delete_out_of_band(self, meeting_id: str) -> None:
        self._call("DELETE", f"rooms/{meeting_id}")

    def reset(self) -> None:
        self._call("POST", "reset")

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
