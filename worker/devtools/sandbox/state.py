"""Sandbox: one lock over rooms, budget and faults; the /v1 dispatch, the call log, the admin operations."""

from __future__ import annotations

import hmac
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict
from http import HTTPStatus
from typing import Any

from worker.devtools.sandbox.budget import POINTS, PointsWindow
from worker.devtools.sandbox.config import SECRETS, TUNABLE, SandboxConfig, check_setting, integer
from worker.devtools.sandbox.faults import Faults, check_step
from worker.devtools.sandbox.participants import Presence
from worker.devtools.sandbox.rooms import Room, Rooms
from worker.devtools.sandbox.webhooks import Delivery, WebhookSender
from worker.devtools.sandbox.wire import BadRequest, Reply, error, iso_ts

# Whereby: "One hour after endDate: host privileges, webhooks, recordings stop."
WEBHOOKS_AFTER_END_SECONDS = 3600.0
INSIGHTS = ("room-sessions", "participants")
Event = tuple[Room, str, dict[str, Any]]


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
            setattr(self.config, name, check_setting(name, getattr(self.config, name)))
        self.clock = clock
        self._lock = threading.Lock()
        # The parts share self.config, so a setting changed here is seen by all of them at once.
        self._rooms = Rooms(self.config)
        self._budget = PointsWindow(self.config)
        self._faults = Faults(self.config)
        self._presence = Presence(self.config)
        self._webhooks = WebhookSender(self.config, tick=self.tick)
        self._rooms.on_delete = self._emptied
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
            self._rooms.expire(now)
            events = self._presence.due(now)
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
                    "at": iso_ts(now),
                    "method": method.upper(),
                    "path": path,
                    "status": reply.status,
                    **entry,
                }
            )
        self._send(now, events)
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
            return error(
                401,
                "Unauthorized: missing or invalid API key",
                {"WWW-Authenticate": "Bearer"},
            )

        parts = path.strip("/").split("/")
        insights = parts[:2] == ["v1", "insights"] and len(parts) == 3 and parts[2] in INSIGHTS
        if not insights and (parts[:2] != ["v1", "meetings"] or len(parts) > 3):
            return error(404, "Not Found")
        meeting_id = parts[2] if len(parts) == 3 and not insights else None
        allowed = ("GET",) if insights else ("GET", "DELETE") if meeting_id is not None else ("GET", "POST")
        if method not in allowed:
            return error(405, "Method Not Allowed", {"Allow": ", ".join(allowed)})
        entry["meeting_id"] = meeting_id
        room = self._rooms.known(meeting_id) if meeting_id is not None else None
        if room is not None:
            entry["room_name"] = room.room_name
        if insights and parts[2] == "room-sessions":
            entry["room_name"] = dict(query).get("roomName")

        cost = self.config.insights_points if insights else POINTS[method]
        throttled = self._budget.throttle(now, cost)
        if throttled is not None:
            return throttled

        step = self._faults.take_step(method)
        if step is not None and step["action"] == "rate_limit":
            entry["fault"] = "rate_limit"
            return self._budget.too_many(now, step["retry_after"], remaining=0)

        # Conservative: a call Whereby admitted costs its points even when it then fails.
        self._budget.charge(now, cost)
        entry["points"] = cost

        lost_mode: str | None = None
        if step is not None and step["action"] == "error":
            entry["fault"] = f"error:{step['status']}"
            return self._budget.with_budget(now, error(step["status"], HTTPStatus(step["status"]).phrase))
        if step is not None and step["action"] == "lost_reply":
            lost_mode = step["mode"] or self.config.lost_reply_mode
        elif step is None:
            status = self._faults.random_error()
            if status is not None:
                entry["fault"] = f"error:{status}"
                return self._budget.with_budget(now, error(status, HTTPStatus(status).phrase))
            lost_mode = self._faults.random_lost_reply(method)

        try:
            if insights:
                reply = self._insights(now, parts[2], dict(query))
            elif method == "POST":
                created, reply = self._rooms.create(now, body)
                entry["meeting_id"] = created.meeting_id
                entry["room_name"] = created.room_name
            elif method == "DELETE":
                assert meeting_id is not None
                reply = self._rooms.delete(now, meeting_id)
            elif meeting_id is not None:
                reply = self._rooms.get(meeting_id, query)
            else:
                reply = self._rooms.list_page(query)
        except BadRequest as exc:
            reply = error(400, str(exc))

        if lost_mode is not None:
            # The work is done; only the answer goes missing, as when a proxy times out.
            entry["fault"] = f"lost_reply:{lost_mode}"
            stall = self.config.stall_seconds if lost_mode == "stall" else 0.0
            return Reply(504, {"error": HTTPStatus(504).phrase}, stall=stall)
        return self._budget.with_budget(now, reply)

    def _insights(self, now: float, kind: str, params: dict[str, str]) -> Reply:
        """Sessions of a room, newest first, or the participants of one session; one page each."""
        if kind == "room-sessions":
            name = params.get("roomName", "").strip()
            if not name:
                raise BadRequest("roomName: required")
            return Reply(200, {"results": self._presence.sessions(now, name), "cursor": None})
        session_id = params.get("roomSessionId", "").strip()
        if not session_id:
            raise BadRequest("roomSessionId: required")
        return Reply(200, {"results": self._presence.session_participants(session_id), "cursor": None})

    # ---- people and webhooks -----------------------------------------------------------------

    def _emptied(self, room: Room) -> None:
        # Called by Rooms under our lock; a deleted room sends no left events: it is gone.
        room.deleted_with_participants = self._presence.evict(
            room.deleted_at or self.clock(), room.meeting_id
        )

    def _live_room(self, now: float, meeting_id: str) -> Room:
        self._rooms.expire(now)
        room = self._rooms.known(meeting_id)
        if room is None or not room.live:
            raise LookupError("meeting_id: no such room (deleted or unknown)")
        return room

    def join(self, meeting_id: str, role: str = "visitor", external_id: str | None = None) -> str:
        """Someone enters a live room; their participantId. LookupError for a deleted or unknown room."""
        with self._lock:
            now = self.clock()
            room = self._live_room(now, meeting_id)
            events = self._presence.due(now)
            participant_id, joined = self._presence.join(now, room, role, external_id)
            events += joined
        self._send(now, events)
        return participant_id

    def leave(self, meeting_id: str, participant_id: str) -> None:
        with self._lock:
            now = self.clock()
            self._live_room(now, meeting_id)
            events = self._presence.due(now)
            events += self._presence.leave(now, meeting_id, participant_id)
        self._send(now, events)

    def participants(self, meeting_id: str) -> list[dict[str, Any]]:
        with self._lock:
            self._rooms.expire(self.clock())
            if self._rooms.known(meeting_id) is None:
                raise LookupError("meeting_id: no such room")
            return self._presence.participants(meeting_id)

    def sessions(self, meeting_id: str) -> list[dict[str, Any]]:
        """The room's insights sessions, newest first, free of charge."""
        with self._lock:
            now = self.clock()
            room = self._rooms.known(meeting_id)
            if room is None:
                raise LookupError("meeting_id: no such room")
            return self._presence.sessions(now, room.room_name)

    def tick(self) -> None:
        """Sends the room.session.ended events whose delay ran out (the sender thread calls it)."""
        with self._lock:
            now = self.clock()
            events = self._presence.due(now)
        self._send(now, events)

    def _send(self, now: float, events: list[Event]) -> None:
        """Wraps events in Whereby's envelope and queues them; never under the lock (it may block briefly)."""
        url, secret = self.config.webhook_url, self.config.webhook_secret
        deliveries = []
        for room, type_, data in events:
            if url is None or now > room.end.timestamp() + WEBHOOKS_AFTER_END_SECONDS:
                continue
            event_id, body = self._webhooks.envelope(now, type_, data)
            deliveries.append(Delivery(event_id, type_, room.meeting_id, body, url, secret))
        self._webhooks.submit(deliveries)
        if self._presence.pending():
            # A session end waits for its delay: the sender's thread notices when it is due.
            self._webhooks.ensure_running()

    def webhook_log(self) -> list[dict[str, Any]]:
        return self._webhooks.entries()

    def webhooks_idle(self) -> bool:
        return self._webhooks.idle()

    def close(self) -> None:
        """Stops the webhook sender; pending deliveries are dropped."""
        self._webhooks.close()

    # ---- admin -------------------------------------------------------------------------------

    def rooms(self, include_deleted: bool = True) -> list[dict[str, Any]]:
        with self._lock:
            self._rooms.expire(self.clock())
            records = self._rooms.records(include_deleted)
            for record in records:
                record["participants"] = self._presence.count(record["meeting_id"])
            return records

    def calls(self, since: int = 0) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(call) for call in self._calls if call["seq"] > since]

    def settings(self) -> dict[str, Any]:
        """The current config without the api_key, plus the pending script."""
        with self._lock:
            return self._settings()

    def _settings(self) -> dict[str, Any]:
        view = {key: value for key, value in asdict(self.config).items() if key not in SECRETS}
        view["webhook_secret_set"] = self.config.webhook_secret is not None
        view["script"] = self._faults.pending()
        return view

    def update(self, changes: Mapping[str, Any]) -> dict[str, Any]:
        """Applies a partial config update and appends script steps, all or nothing."""
        checked: dict[str, Any] = {}
        steps: list[dict[str, Any]] = []
        for key, value in changes.items():
            if key == "script":
                if not isinstance(value, list):
                    raise BadRequest("script: must be a list of steps")
                steps = [check_step(step) for step in value]
            elif key in TUNABLE:
                checked[key] = check_setting(key, value)
            else:
                raise BadRequest(f"{key}: unknown setting")
        with self._lock:
            for key, value in checked.items():
                setattr(self.config, key, value)
            self._faults.extend(steps)
            return self._settings()

    def script(self, *steps: Mapping[str, Any]) -> None:
        self.update({"script": [dict(step) for step in steps]})

    def spend(self, points: int) -> None:
        """Points spent by another app of the same organisation: they count, over budget or not."""
        checked = integer("points", points, 1)
        with self._lock:
            self._budget.charge(self.clock(), checked)

    def delete_out_of_band(self, meeting_id: str) -> bool:
        """Deletes a room behind the client's back; False when the id was never seen."""
        with self._lock:
            now = self.clock()
            self._rooms.expire(now)
            return self._rooms.delete_out_of_band(now, meeting_id)

    def reset(self) -> None:
        with self._lock:
            self._presence.clear()
            self._webhooks.reset()
            self._rooms.clear()
            self._budget.clear()
            self._faults.reset()
            self._calls.clear()
            self._seq = 0
