"""Tests of the Whereby sandbox, over real HTTP against a SandboxServer."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from worker.devtools.sandbox import (
    TUNABLE,
    Sandbox,
    SandboxAdmin,
    SandboxConfig,
    SandboxServer,
)

API_KEY = "test-key-7f3a91c2-never-log-me"
PUBLIC_URL = "https://rooms.sandbox.test"
UUID_RE = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"


class FakeClock:
    """Stands in for time.time so the budget window and expiry move without sleeping."""

    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Env:
    server: SandboxServer
    sandbox: Sandbox
    clock: FakeClock
    api: httpx.Client  # sends the key
    raw: httpx.Client  # sends no key
    admin: SandboxAdmin

    def iso(self, offset: float) -> str:
        """An ISO-8601 UTC instant `offset` seconds from the sandbox's now."""
        moment = datetime.fromtimestamp(self.clock.now + offset, UTC)
        return moment.strftime("%Y-%m-%dT%H:%M:%SZ")

    def create(self, **body: Any) -> httpx.Response:
        body.setdefault("endDate", self.iso(3600))
        return self.api.post("/meetings", json=body)

    def created(self, **body: Any) -> dict[str, Any]:
        response = self.create(**body)
        assert response.status_code == 201, response.text
        meeting: dict[str, Any] = response.json()
        return meeting


@pytest.fixture(scope="module")
def server() -> Iterator[SandboxServer]:
    with SandboxServer(SandboxConfig(api_key=API_KEY, public_url=PUBLIC_URL)) as srv:
        yield srv


@pytest.fixture(scope="module")
def clients(server: SandboxServer) -> Iterator[tuple[httpx.Client, httpx.Client, SandboxAdmin]]:
    # Shared: building an httpx client costs ~50 ms, which would be most of this file's time.
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with (
        httpx.Client(base_url=server.url, headers=headers, timeout=5) as api,
        httpx.Client(base_url=server.url, timeout=5) as raw,
        SandboxAdmin(server.admin_url) as admin,
    ):
        yield api, raw, admin


@pytest.fixture
def env(server: SandboxServer, clients: tuple[httpx.Client, httpx.Client, SandboxAdmin]) -> Iterator[Env]:
    sandbox = server.sandbox
    defaults = replace(sandbox.config)
    clock = FakeClock(time.time())
    sandbox.clock = clock
    sandbox.reset()
    yield Env(server, sandbox, clock, *clients)
    for name in TUNABLE:
        setattr(sandbox.config, name, getattr(defaults, name))
    sandbox.reset()
    sandbox.clock = time.time


def parse(stamp: str) -> datetime:
    assert stamp.endswith("Z"), stamp
    return datetime.fromisoformat(stamp[:-1] + "+00:00")


# ---- auth ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-key"},
        {"Authorization": f"Basic {API_KEY}"},
        {"Authorization": "Bearer"},
    ],
    ids=["missing", "wrong", "basic", "empty"],
)
def test_bad_or_missing_key_is_401_and_does_nothing(env: Env, headers: dict[str, str]) -> None:
    response = env.raw.post("/meetings", json={"endDate": env.iso(3600)}, headers=headers)
    listing = env.raw.get("/meetings", headers=headers)
    assert response.status_code == 401
    assert listing.status_code == 401
    assert "error" in response.json()
    assert API_KEY not in response.text
    assert env.admin.rooms() == []
    assert [call["points"] for call in env.admin.calls()] == [0, 0]


def test_right_key_is_accepted_case_insensitive_scheme(env: Env) -> None:
    headers = {"Authorization": f"bearer {API_KEY}"}
    response = env.raw.get("/meetings", headers=headers)
    assert response.status_code == 200
    assert response.json() == {"results": [], "cursor": None}


# ---- create and validation -----------------------------------------------------------------


def test_create_returns_a_whereby_meeting(env: Env) -> None:
    end = env.iso(7200)
    meeting = env.created(endDate=end, roomNamePrefix="rk-")
    assert meeting["meetingId"].isdigit()
    assert re.fullmatch(rf"/rk-{UUID_RE}", meeting["roomName"])
    assert meeting["roomUrl"] == PUBLIC_URL + meeting["roomName"]
    assert abs(parse(meeting["startDate"]).timestamp() - env.clock.now) < 0.002
    assert parse(meeting["endDate"]) == parse(end)
    assert "hostRoomUrl" not in meeting
    assert "viewerRoomUrl" not in meeting
    second = env.created()
    assert int(second["meetingId"]) > int(meeting["meetingId"])
    assert re.fullmatch(rf"/{UUID_RE}", second["roomName"])


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ("2031-03-04T05:06:07", "2031-03-04T05:06:07.000Z"),
        ("2031-03-04T05:06:07Z", "2031-03-04T05:06:07.000Z"),
        ("2031-03-04T05:06:07.250Z", "2031-03-04T05:06:07.250Z"),
        ("2031-03-04T07:06:07+02:00", "2031-03-04T05:06:07.000Z"),
        ("2031-03-04T00:06:07-05:00", "2031-03-04T05:06:07.000Z"),
    ],
)
def test_end_date_is_utc_without_offset_and_answered_in_utc(env: Env, written: str, expected: str) -> None:
    assert env.created(endDate=written)["endDate"] == expected


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"endDate": None}, "endDate"),
        ({"endDate": "next tuesday"}, "endDate"),
        ({"endDate": 1893456000}, "endDate"),
        ({"endDate": "PAST"}, "endDate"),
        ({"roomNamePrefix": "bad_prefix"}, "roomNamePrefix"),
        ({"roomNamePrefix": "a" * 40}, "roomNamePrefix"),
        ({"roomNamePrefix": "caf\u00e9"}, "roomNamePrefix"),
        ({"roomNamePrefix": 7}, "roomNamePrefix"),
        ({"roomNamePattern": "short"}, "roomNamePattern"),
        ({"roomMode": "huge"}, "roomMode"),
        ({"isLocked": "yes"}, "isLocked"),
        ({"isLocked": 1}, "isLocked"),
        ({"fields": "hostRoomUrl"}, "fields"),
        ({"fields": ["hostRoomUrl", "adminRoomUrl"]}, "fields"),
        ({"templateType": "webinar"}, "templateType"),
    ],
)
def test_invalid_create_is_400_naming_the_field(env: Env, body: dict[str, Any], field: str) -> None:
    if body.get("endDate") == "PAST":
        body["endDate"] = env.iso(-10)
    payload = {"endDate": env.iso(3600), **body}
    if payload["endDate"] is None:
        del payload["endDate"]
    response = env.api.post("/meetings", json=payload)
    assert response.status_code == 400
    assert response.json()["error"].startswith(f"{field}: ")
    assert env.admin.rooms() == []


@pytest.mark.parametrize("raw", [b"not json", b"[1, 2]", b""])
def test_body_that_is_not_a_json_object_is_400(env: Env, raw: bytes) -> None:
    response = env.api.post("/meetings", content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"].startswith("body: ")


def test_end_date_allows_a_second_of_clock_slack(env: Env) -> None:
    just_gone = datetime.fromtimestamp(env.clock.now - 0.5, UTC).isoformat()
    assert env.create(endDate=just_gone).status_code == 201
    long_gone = datetime.fromtimestamp(env.clock.now - 3, UTC).isoformat()
    assert env.create(endDate=long_gone).status_code == 400


def test_prefix_is_lower_cased_and_stripped_of_white_space(env: Env) -> None:
    meeting = env.created(roomNamePrefix="  RK Team-1\t")
    assert re.fullmatch(rf"/rkteam-1{UUID_RE}", meeting["roomName"])


def test_unknown_fields_and_start_date_are_ignored(env: Env) -> None:
    meeting = env.created(startDate="2001-01-01T00:00:00Z", somethingNew={"x": 1})
    assert meeting["startDate"] != "2001-01-01T00:00:00.000Z"


def test_human_short_names_are_six_unambiguous_lower_case_characters(env: Env) -> None:
    names = {env.created(roomNamePrefix="hs-", roomNamePattern="human-short")["roomName"] for _ in range(5)}
    assert len(names) == 5
    for name in names:
        assert re.fullmatch(r"/hs-[abcdefghjkmnpqrstuvwxyz23456789]{6}", name)


# ---- extra URLs ----------------------------------------------------------------------------


def test_extra_urls_only_when_asked_for(env: Env) -> None:
    meeting = env.created(fields=["hostRoomUrl"])
    host = meeting["hostRoomUrl"]
    assert host.startswith(meeting["roomUrl"] + "?roomKey=")
    assert "viewerRoomUrl" not in meeting
    path = f"/meetings/{meeting['meetingId']}"

    plain = env.api.get(path).json()
    assert "hostRoomUrl" not in plain
    assert "viewerRoomUrl" not in plain

    both = env.api.get(path, params={"fields": "hostRoomUrl,viewerRoomUrl"}).json()
    assert both["hostRoomUrl"] == host
    assert both["viewerRoomUrl"].startswith(meeting["roomUrl"] + "?roomKey=")
    assert both["viewerRoomUrl"] != host

    listed = env.api.get("/meetings", params={"fields": "viewerRoomUrl"}).json()
    assert listed["results"][0]["viewerRoomUrl"] == both["viewerRoomUrl"]
    assert "hostRoomUrl" not in listed["results"][0]

    bad = env.api.get(path, params={"fields": "hostRoomUrl,secret"})
    assert bad.status_code == 400
    assert bad.json()["error"].startswith("fields: ")


def test_viewer_mode_template_forces_locked_group_room_with_both_urls(env: Env) -> None:
    meeting = env.created(templateType="viewerMode", roomMode="normal", isLocked=False)
    assert meeting["hostRoomUrl"].startswith(meeting["roomUrl"] + "?roomKey=")
    assert meeting["viewerRoomUrl"].startswith(meeting["roomUrl"] + "?roomKey=")
    (record,) = env.admin.rooms()
    assert record["room_mode"] == "group"
    assert record["is_locked"] is True


def test_room_mode_and_lock_are_kept(env: Env) -> None:
    env.created(roomMode="group", isLocked=True)
    (record,) = env.admin.rooms()
    assert (record["room_mode"], record["is_locked"]) == ("group", True)


# ---- get, list, delete ---------------------------------------------------------------------


def test_get_delete_lifecycle_and_idempotent_delete(env: Env) -> None:
    meeting = env.created()
    path = f"/meetings/{meeting['meetingId']}"
    fetched = env.api.get(path)
    assert fetched.status_code == 200
    assert fetched.json() == meeting

    first = env.api.delete(path)
    assert first.status_code == 204
    assert first.content == b""
    assert env.api.get(path).status_code == 404
    assert env.api.delete(path).status_code == 204

    (record,) = env.admin.rooms()
    assert record["live"] is False
    assert record["deleted_by"] == "api"
    assert abs(parse(record["deleted_at"]).timestamp() - env.clock.now) < 0.002
    assert env.admin.rooms(include_deleted=False) == []


def test_unknown_ids(env: Env) -> None:
    assert env.api.get("/meetings/999999").status_code == 404
    assert env.api.delete("/meetings/999999").status_code == 204
    env.admin.set_faults(delete_unknown_status=404)
    assert env.api.delete("/meetings/999999").status_code == 404


def test_list_pages_in_id_order_with_prefix_filter(env: Env) -> None:
    wanted = []
    for index in range(8):
        prefix = "pg-" if index % 4 else "other-"
        meeting = env.created(roomNamePrefix=prefix)
        if prefix == "pg-":
            wanted.append(meeting["meetingId"])
    gone = wanted.pop(2)
    assert env.api.delete(f"/meetings/{gone}").status_code == 204

    pages: list[list[str]] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 2, "roomName[startsWith]": "/pg-"}
        if cursor is not None:
            params["cursor"] = cursor
        response = env.api.get("/meetings", params=params)
        assert response.status_code == 200
        body = response.json()
        pages.append([result["meetingId"] for result in body["results"]])
        assert all(r["roomName"].startswith("/pg-") for r in body["results"])
        cursor = body["cursor"]
        if cursor is None:
            break
        assert isinstance(cursor, str)
    assert [len(page) for page in pages] == [2, 2, 1]
    assert [meeting_id for page in pages for meeting_id in page] == wanted

    everything = env.api.get("/meetings").json()
    assert len(everything["results"]) == 7
    assert everything["cursor"] is None
    ids = [int(result["meetingId"]) for result in everything["results"]]
    assert ids == sorted(ids)


def test_exactly_full_last_page_has_null_cursor(env: Env) -> None:
    for _ in range(4):
        env.created()
    first = env.api.get("/meetings", params={"limit": 2}).json()
    second = env.api.get("/meetings", params={"limit": 2, "cursor": first["cursor"]}).json()
    assert len(second["results"]) == 2
    assert second["cursor"] is None


@pytest.mark.parametrize("limit", ["0", "101", "ten", "-1", "2.5"])
def test_list_limit_out_of_range_is_400(env: Env, limit: str) -> None:
    response = env.api.get("/meetings", params={"limit": limit})
    assert response.status_code == 400
    assert response.json()["error"].startswith("limit: ")


def test_list_bad_cursor_is_400(env: Env) -> None:
    response = env.api.get("/meetings", params={"cursor": "@@not-a-cursor@@"})
    assert response.status_code == 400
    assert response.json()["error"].startswith("cursor: ")


def test_unknown_route_and_method(env: Env) -> None:
    assert env.api.get("/rooms").status_code == 404
    response = env.api.put("/meetings", json={})
    assert response.status_code == 405
    assert set(response.headers["allow"].split(", ")) == {"GET", "POST"}


# ---- budget --------------------------------------------------------------------------------


def test_over_budget_is_429_with_headers_and_costs_nothing(env: Env) -> None:
    env.admin.set_faults(points_per_minute=10)
    for _ in range(3):
        response = env.create()
        assert response.status_code == 201
        env.clock.advance(1)
    assert response.headers["X-RateLimit-Remaining"] == "1"

    refused = env.create()
    assert refused.status_code == 429
    # The first create (at t=0) leaves the window at t=60; now is t=3.
    assert refused.headers["Retry-After"] == "57"
    assert refused.headers["X-RateLimit-Limit"] == "10"
    assert refused.headers["X-RateLimit-Remaining"] == "1"
    reset_at = datetime.strptime(refused.headers["X-RateLimit-Reset"], "%a, %d %b %Y %H:%M:%S GMT")
    expected = datetime.fromtimestamp(env.clock.now + 57, UTC).replace(tzinfo=None)
    assert abs(reset_at - expected) <= timedelta(seconds=1)
    assert refused.json() == {
        "error": "Rate limit active for throttle key: organization:1",
        "data": {"msLeft": 57000},
    }
    assert len(env.admin.rooms()) == 3

    # The refusal spent nothing: the last point is still there for a read.
    read = env.api.get("/meetings")
    assert read.status_code == 200
    assert read.headers["X-RateLimit-Remaining"] == "0"
    assert env.api.get("/meetings").status_code == 429
    assert [call["points"] for call in env.admin.calls()] == [3, 3, 3, 0, 1, 0]


def test_budget_window_slides(env: Env) -> None:
    env.admin.set_faults(points_per_minute=6)
    assert env.create().status_code == 201  # t=0
    env.clock.advance(30)
    assert env.create().status_code == 201  # t=30
    env.clock.advance(29.5)
    refused = env.create()  # t=59.5: both creates still in the window
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "1"
    assert refused.json()["data"]["msLeft"] == 500
    env.clock.advance(0.5)
    assert env.create().status_code == 201  # t=60: the first create has left
    env.clock.advance(29)
    refused = env.create()  # t=89: creates at 30 and 60 fill the window
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "1"
    env.clock.advance(1)
    assert env.create().status_code == 201


def test_points_spent_by_another_app_count(env: Env) -> None:
    env.admin.set_faults(points_per_minute=10)
    env.admin.spend(9)
    assert env.api.get("/meetings").status_code == 200
    refused = env.api.get("/meetings")
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "60"
    env.clock.advance(60)
    assert env.create().status_code == 201


def test_auth_is_checked_before_the_budget(env: Env) -> None:
    env.admin.set_faults(points_per_minute=5)
    env.admin.spend(5)
    anonymous = env.raw.get("/meetings")
    assert anonymous.status_code == 401
    assert env.api.get("/meetings").status_code == 429


def test_call_dearer_than_the_whole_budget_waits_a_window(env: Env) -> None:
    env.admin.set_faults(points_per_minute=2)
    refused = env.create()
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "60"
    assert env.api.get("/meetings").status_code == 200


# ---- faults --------------------------------------------------------------------------------


def test_scripted_error_does_no_work(env: Env) -> None:
    env.admin.script({"method": "POST", "action": "error", "status": 503})
    failed = env.create()
    assert failed.status_code == 503
    assert "error" in failed.json()
    assert env.admin.rooms() == []
    assert env.create().status_code == 201
    assert len(env.admin.rooms()) == 1
    assert [call["fault"] for call in env.admin.calls()] == ["error:503", None]


def test_scripted_lost_reply_creates_the_room_but_answers_504(env: Env) -> None:
    env.admin.script({"method": "POST", "action": "lost_reply"})
    lost = env.create(roomNamePrefix="lost-")
    assert lost.status_code == 504
    (record,) = env.admin.rooms()
    assert record["live"] is True
    assert record["room_name"].startswith("/lost-")
    (call,) = env.admin.calls()
    assert call["status"] == 504
    assert call["fault"] == "lost_reply:error"
    assert call["meeting_id"] == record["meeting_id"]
    assert call["points"] == 3
    # No idempotency key: the retry makes a second room.
    assert env.create(roomNamePrefix="lost-").status_code == 201
    assert len(env.admin.rooms()) == 2


def test_script_steps_are_consumed_by_matching_methods_in_order(env: Env) -> None:
    meeting = env.created()
    path = f"/meetings/{meeting['meetingId']}"
    env.admin.script(
        {"method": "DELETE", "action": "error", "status": 500},
        {"method": "*", "action": "error", "status": 502},
    )
    assert env.api.get(path).status_code == 502  # the "*" step, skipping the DELETE one
    assert env.api.get(path).status_code == 200
    assert env.api.delete(path).status_code == 500
    assert env.admin.rooms()[0]["live"] is True
    assert env.api.delete(path).status_code == 204
    assert env.admin.rooms()[0]["live"] is False


def test_scripted_lost_reply_on_delete_still_deletes(env: Env) -> None:
    meeting = env.created()
    env.admin.script({"method": "DELETE", "action": "lost_reply"})
    assert env.api.delete(f"/meetings/{meeting['meetingId']}").status_code == 504
    assert env.admin.rooms()[0]["deleted_by"] == "api"


def test_scripted_rate_limit(env: Env) -> None:
    env.admin.script({"method": "*", "action": "rate_limit", "retry_after": 2})
    refused = env.api.get("/meetings")
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "2"
    assert refused.json()["data"]["msLeft"] == 2000
    assert env.api.get("/meetings").status_code == 200
    assert [(c["status"], c["points"], c["fault"]) for c in env.admin.calls()] == [
        (429, 0, "rate_limit"),
        (200, 1, None),
    ]


def test_random_errors_do_no_work(env: Env) -> None:
    env.admin.set_faults(error_rate=1.0)
    statuses = {env.create().status_code for _ in range(10)}
    assert statuses <= {500, 502, 503}
    assert env.admin.rooms() == []


def test_random_lost_replies_create_rooms(env: Env) -> None:
    env.admin.set_faults(lost_reply_rate=1.0)
    assert [env.create().status_code for _ in range(3)] == [504, 504, 504]
    assert len(env.admin.rooms()) == 3
    assert env.api.get("/meetings").status_code == 200  # only POSTs lose replies


def test_stalled_lost_reply_times_the_client_out_after_creating(env: Env) -> None:
    env.admin.set_faults(lost_reply_rate=1.0, lost_reply_mode="stall", stall_seconds=0.4)
    with pytest.raises(httpx.ReadTimeout):
        env.api.post("/meetings", json={"endDate": env.iso(60)}, timeout=0.1)
    assert len(env.admin.rooms()) == 1
    assert env.admin.calls()[0]["fault"] == "lost_reply:stall"


def test_latency_is_added_to_every_call(env: Env) -> None:
    env.admin.set_faults(latency_ms=150)
    started = time.monotonic()
    assert env.api.get("/meetings").status_code == 200
    assert time.monotonic() - started >= 0.15


def test_seeded_faults_are_reproducible() -> None:
    def run() -> list[int]:
        sandbox = Sandbox(SandboxConfig(error_rate=0.5, lost_reply_rate=0.3, seed=7))
        end = datetime.fromtimestamp(time.time() + 3600, UTC).isoformat().encode()
        body = b'{"endDate": "' + end + b'"}'
        auth = "Bearer sandbox-key"
        return [sandbox.handle("POST", "/v1/meetings", [], auth, body).status for _ in range(40)]

    first = run()
    assert first == run()
    assert {201, 504} <= set(first)
    assert set(first) & {500, 502, 503}


def test_faults_endpoint_validates_and_hides_the_key(env: Env) -> None:
    config = env.admin.set_faults(error_rate=0.25, latency_ms=0)
    assert config["error_rate"] == 0.25
    assert "api_key" not in config
    assert API_KEY not in json.dumps(config)
    base = env.server.admin_url
    for bad in (
        {"api_key": "x"},
        {"colour": "blue"},
        {"error_rate": 2},
        {"lost_reply_mode": "explode"},
        {"delete_unknown_status": 500},
        {"points_per_minute": -1},
        {"script": [{"method": "PATCH", "action": "error"}]},
        {"script": [{"action": "teleport"}]},
    ):
        response = env.raw.post(base + "/faults", json=bad)
        assert response.status_code == 400, bad
        assert response.json()["error"].split(":")[0] in {*bad, "script"}
    assert env.sandbox.config.error_rate == 0.25
    assert env.sandbox.config.api_key == API_KEY
    with pytest.raises(RuntimeError, match="400"):
        env.admin.set_faults(nonsense=1)


# ---- out of band, expiry, log, reset -------------------------------------------------------


def test_out_of_band_delete(env: Env) -> None:
    meeting = env.created()
    path = f"/meetings/{meeting['meetingId']}"
    env.admin.delete_out_of_band(meeting["meetingId"])
    assert env.api.get(path).status_code == 404
    assert env.api.get("/meetings").json()["results"] == []
    assert env.api.delete(path).status_code == 204
    (record,) = env.admin.rooms()
    assert record["deleted_by"] == "out_of_band"
    with pytest.raises(RuntimeError, match="404"):
        env.admin.delete_out_of_band("424242")


def test_rooms_expire_after_end_date_plus_expiry(env: Env) -> None:
    soon = env.created(endDate=env.iso(60))
    later = env.created(endDate=env.iso(600))
    env.clock.advance(60 + 86400 - 1)
    assert env.api.get(f"/meetings/{soon['meetingId']}").status_code == 200
    env.clock.advance(1)
    assert env.api.get(f"/meetings/{soon['meetingId']}").status_code == 404
    assert [r["meetingId"] for r in env.api.get("/meetings").json()["results"]] == [later["meetingId"]]
    records = {record["meeting_id"]: record for record in env.admin.rooms()}
    expired = records[soon["meetingId"]]
    assert expired["deleted_by"] == "expiry"
    assert parse(expired["deleted_at"]) == parse(soon["endDate"]) + timedelta(days=1)
    assert records[later["meetingId"]]["live"] is True
    # A delete after Whereby expired it is still a 204 and keeps who deleted it.
    assert env.api.delete(f"/meetings/{soon['meetingId']}").status_code == 204
    assert env.admin.rooms()[0]["deleted_by"] == "expiry"


def test_expiry_setting_applies_to_existing_rooms(env: Env) -> None:
    meeting = env.created(endDate=env.iso(30))
    env.clock.advance(31)
    assert env.api.get(f"/meetings/{meeting['meetingId']}").status_code == 200
    env.admin.set_faults(expiry_seconds=0)
    assert env.admin.rooms(include_deleted=False) == []
    assert env.admin.rooms()[0]["deleted_by"] == "expiry"


def test_call_log_records_every_call_but_never_the_key(env: Env) -> None:
    meeting = env.created(fields=["hostRoomUrl"])
    env.api.get(f"/meetings/{meeting['meetingId']}")
    env.api.post("/meetings", json={"endDate": "nope"})
    env.api.delete(f"/meetings/{meeting['meetingId']}")
    env.raw.get("/meetings", headers={"Authorization": "Bearer guess"})

    calls = env.admin.calls()
    assert [(c["method"], c["status"], c["points"]) for c in calls] == [
        ("POST", 201, 3),
        ("GET", 200, 1),
        ("POST", 400, 3),
        ("DELETE", 204, 2),
        ("GET", 401, 0),
    ]
    assert [c["seq"] for c in calls] == [1, 2, 3, 4, 5]
    assert calls[0]["path"] == "/v1/meetings"
    assert calls[1]["path"] == f"/v1/meetings/{meeting['meetingId']}"
    for call in (calls[0], calls[1], calls[3]):
        assert call["meeting_id"] == meeting["meetingId"]
        assert call["room_name"] == meeting["roomName"]
    assert calls[2]["meeting_id"] is None
    assert all(call["fault"] is None for call in calls)
    assert abs(parse(calls[0]["at"]).timestamp() - env.clock.now) < 0.002
    dumped = json.dumps(calls)
    assert API_KEY not in dumped
    assert "guess" not in dumped
    assert "roomKey" not in dumped
    assert [c["seq"] for c in env.admin.calls(since=3)] == [4, 5]


def test_reset_clears_state_but_ids_keep_increasing(env: Env) -> None:
    first = env.created()
    env.admin.set_faults(points_per_minute=4)
    env.admin.script({"method": "GET", "action": "error", "status": 500})
    env.admin.reset()
    assert env.admin.rooms() == []
    assert env.admin.calls() == []
    assert env.sandbox.settings()["script"] == []
    assert env.sandbox.config.points_per_minute == 4
    second = env.created()  # the budget was cleared too, and the GET step is gone
    assert int(second["meetingId"]) > int(first["meetingId"])
    assert env.api.get(f"/meetings/{first['meetingId']}").status_code == 404


def test_admin_health_and_server_stop() -> None:
    server = SandboxServer().start()
    admin_url = server.admin_url
    try:
        assert httpx.get(admin_url + "/health", timeout=5).json() == {"ok": True}
        assert server.url.startswith("http://127.0.0.1:")
        assert server.url.endswith("/v1")
    finally:
        server.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(admin_url + "/health", timeout=1)
