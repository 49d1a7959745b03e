"""The /_sandbox admin API, both ends: its routes in the app, and SandboxAdmin, its client."""

from __future__ import annotations

import json
from types import TracebackType
from typing import Any, Self

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from worker.devtools.sandbox.api import sandbox_of
from worker.devtools.sandbox.wire import BadRequest

# ---- the routes ------------------------------------------------------------------------------


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
    return JSONResponse(sandbox_of(request).rooms(include_deleted=include))


async def _admin_calls(request: Request) -> Response:
    since = request.query_params.get("since", "0")
    if not since.isdigit():
        return JSONResponse({"error": "since: must be a non-negative integer"}, status_code=400)
    return JSONResponse(sandbox_of(request).calls(int(since)))


async def _admin_faults(request: Request) -> Response:
    sandbox = sandbox_of(request)
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
        sandbox_of(request).spend(points)
    except BadRequest as exc:
        return JSONResponse({"error": str(exc)}, status_code=400)
    return JSONResponse({"ok": True})


async def _admin_delete(request: Request) -> Response:
    if sandbox_of(request).delete_out_of_band(request.path_params["meeting_id"]):
        return Response(status_code=204)
    return JSONResponse({"error": "Not Found"}, status_code=404)


def _missing(exc: LookupError) -> Response:
    return JSONResponse({"error": str(exc.args[0]) if exc.args else "Not Found"}, status_code=404)


async def _admin_join(request: Request) -> Response:
    try:
        body = await _json_object(request)
        participant_id = sandbox_of(request).join(
            request.path_params["meeting_id"], body.get("role", "visitor"), body.get("external_id")
        )
    except BadRequest as exc:
        return JSONResponse({"error": str(exc)}, status_code=400)
    except LookupError as exc:
        return _missing(exc)
    return JSONResponse({"participantId": participant_id}, status_code=201)


async def _admin_participants(request: Request) -> Response:
    try:
        return JSONResponse(sandbox_of(request).participants(request.path_params["meeting_id"]))
    except LookupError as exc:
        return _missing(exc)


async def _admin_leave(request: Request) -> Response:
    try:
        sandbox_of(request).leave(request.path_params["meeting_id"], request.path_params["participant_id"])
    except LookupError as exc:
        return _missing(exc)
    return Response(status_code=204)


async def _admin_sessions(request: Request) -> Response:
    try:
        return JSONResponse(sandbox_of(request).sessions(request.path_params["meeting_id"]))
    except LookupError as exc:
        return _missing(exc)


async def _admin_webhooks(request: Request) -> Response:
    sandbox = sandbox_of(request)
    return JSONResponse({"idle": sandbox.webhooks_idle(), "deliveries": sandbox.webhook_log()})


async def _admin_reset(request: Request) -> Response:
    sandbox_of(request).reset()
    return JSONResponse({"ok": True})


ROUTES = [
    Route("/_sandbox/health", _health, methods=["GET"]),
    Route("/_sandbox/rooms", _admin_rooms, methods=["GET"]),
    Route("/_sandbox/rooms/{meeting_id}", _admin_delete, methods=["DELETE"]),
    Route("/_sandbox/rooms/{meeting_id}/participants", _admin_participants, methods=["GET"]),
    Route("/_sandbox/rooms/{meeting_id}/participants", _admin_join, methods=["POST"]),
    Route("/_sandbox/rooms/{meeting_id}/participants/{participant_id}", _admin_leave, methods=["DELETE"]),
    Route("/_sandbox/rooms/{meeting_id}/sessions", _admin_sessions, methods=["GET"]),
    Route("/_sandbox/webhooks", _admin_webhooks, methods=["GET"]),
    Route("/_sandbox/calls", _admin_calls, methods=["GET"]),
    Route("/_sandbox/faults", _admin_faults, methods=["GET", "POST"]),
    Route("/_sandbox/spend", _admin_spend, methods=["POST"]),
    Route("/_sandbox/reset", _admin_reset, methods=["POST"]),
]


# ---- the client ------------------------------------------------------------------------------


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

    def join(self, meeting_id: str, role: str = "visitor", external_id: str | None = None) -> str:
        """Someone enters the room (role host, visitor or viewer); their participantId."""
        body = {"role": role, "external_id": external_id}
        participant_id: str = self._call("POST", f"rooms/{meeting_id}/participants", json=body).json()[
            "participantId"
        ]
        return participant_id

    def leave(self, meeting_id: str, participant_id: str) -> None:
        self._call("DELETE", f"rooms/{meeting_id}/participants/{participant_id}")

    def participants(self, meeting_id: str) -> list[dict[str, Any]]:
        people: list[dict[str, Any]] = self._call("GET", f"rooms/{meeting_id}/participants").json()
        return people

    def sessions(self, meeting_id: str) -> list[dict[str, Any]]:
        """The room's insights sessions, newest first (free: no points spent)."""
        sessions: list[dict[str, Any]] = self._call("GET", f"rooms/{meeting_id}/sessions").json()
        return sessions

    def webhook_log(self) -> list[dict[str, Any]]:
        """Every delivery attempt so far, dropped ones included, in the order they happened."""
        log: list[dict[str, Any]] = self._call("GET", "webhooks").json()["deliveries"]
        return log

    def webhooks_idle(self) -> bool:
        """True when no delivery waits to be sent or is being sent."""
        idle: bool = self._call("GET", "webhooks").json()["idle"]
        return idle

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
