"""Tests for the Whereby client against httpx.MockTransport: no network, no sleeping."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest

from worker.adapters import whereby
from worker.adapters.whereby import (
    APIConnectionError,
    APITimeoutError,
    AuthenticationError,
    CallRecord,
    CreateMeetingRequest,
    InvalidRequestError,
    Meeting,
    NotFoundError,
    PermissionDeniedError,
    RateLimitedError,
    ServerError,
    WherebyClient,
    WherebyError,
    make_status_error,
)

API_KEY = "wb-test-key-7f3a9c1e5d"
BASE_URL = "https://api.whereby.test/v1"

MEETING_JSON: dict[str, Any] = {
    "meetingId": 91813546,
    "roomName": "/booking-42-1a2b3c",
    "roomUrl": "https://example.whereby.com/booking-42-1a2b3c",
    "startDate": "2030-05-01T09:00:00.000Z",
    "endDate": "2030-05-01T14:30:00+02:00",
    "hostRoomUrl": "https://example.whereby.com/booking-42-1a2b3c?roomKey=abc",
    "somethingWherebyAddedLater": {"x": 1},
}

# A reply is a Response, or an httpx exception class raised as if the network failed.
Reply = httpx.Response | type[httpx.RequestError]


class Script:
    """A MockTransport handler that answers with the given replies in order."""

    def __init__(self, *replies: Reply) -> None:
        self.replies = list(replies)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        reply = self.replies.pop(0)
        if isinstance(reply, httpx.Response):
            return reply
        raise reply("simulated network failure", request=request)

    @property
    def paths(self) -> list[str]:
        return [r.url.path for r in self.requests]


def client_for(script: Script, **kwargs: Any) -> WherebyClient:
    kwargs.setdefault("retry_wait_min", 0)
    kwargs.setdefault("retry_wait_max", 0)
    return WherebyClient(BASE_URL, API_KEY, transport=httpx.MockTransport(script), **kwargs)


def ok(body: Any, status: int = 200) -> httpx.Response:
    return httpx.Response(status, json=body)


def error(status: int, body: Any = None, **kwargs: Any) -> httpx.Response:
    if body is None:
        return httpx.Response(status, **kwargs)
    return httpx.Response(status, json=body, **kwargs)


def create_request(**kwargs: Any) -> CreateMeetingRequest:
    return CreateMeetingRequest(end_date=datetime(2030, 5, 1, 12, 30, tzinfo=UTC), **kwargs)


# --------------------------------------------------------------------------- serialisation


def test_create_meeting_sends_camel_case_body_with_utc_end_date() -> None:
    script = Script(ok(MEETING_JSON, 201))
    request = CreateMeetingRequest(
        end_date=datetime(2030, 5, 1, 14, 30, tzinfo=timezone(timedelta(hours=2))),
        room_name_prefix="booking-42",
        room_name_pattern="human-short",
        room_mode="group",
        is_locked=False,
        fields=["hostRoomUrl"],
    )

    with client_for(script) as client:
        client.create_meeting(request)

    (sent,) = script.requests
    assert sent.method == "POST"
    assert sent.url == "https://api.whereby.test/v1/meetings"
    assert sent.headers["content-type"] == "application/json"
    assert json.loads(sent.content) == {
        "endDate": "2030-05-01T12:30:00Z",
        "roomNamePrefix": "booking-42",
        "roomNamePattern": "human-short",
        "roomMode": "group",
        "isLocked": False,
        "fields": ["hostRoomUrl"],
    }


def test_requests_carry_bearer_key_user_agent_and_default_timeout() -> None:
    script = Script(ok(MEETING_JSON))

    with client_for(script) as client:
        client.get_meeting("1")

    (sent,) = script.requests
    assert sent.headers["authorization"] == f"Bearer {API_KEY}"
    assert sent.headers["user-agent"].startswith("roomkeeper/")
    assert sent.extensions["timeout"] == httpx.Timeout(10.0, connect=5.0).as_dict()


def test_to_body_omits_none_and_keeps_microseconds_and_reads_naive_time_as_utc() -> None:
    body = CreateMeetingRequest(end_date=datetime(2030, 1, 2, 3, 4, 5, 123456)).to_body()

    assert body == {"endDate": "2030-01-02T03:04:05.123456Z"}


def test_to_body_includes_template_type_and_populates_by_alias() -> None:
    request = CreateMeetingRequest.model_validate(
        {"endDate": "2030-01-02T03:04:05Z", "templateType": "viewerMode"}
    )

    assert request.to_body() == {
        "endDate": "2030-01-02T03:04:05Z",
        "templateType": "viewerMode",
    }


def test_response_parsing_coerces_int_id_and_normalises_dates_to_utc() -> None:
    script = Script(ok(MEETING_JSON, 201))

    with client_for(script) as client:
        meeting = client.create_meeting(create_request())

    assert meeting.meeting_id == "91813546"
    assert meeting.room_name == "/booking-42-1a2b3c"
    assert meeting.room_url == "https://example.whereby.com/booking-42-1a2b3c"
    assert meeting.host_room_url is not None and "roomKey" in meeting.host_room_url
    assert meeting.viewer_room_url is None
    assert meeting.end_date == datetime(2030, 5, 1, 12, 30, tzinfo=UTC)
    assert meeting.end_date.utcoffset() == timedelta(0)
    assert meeting.start_date == datetime(2030, 5, 1, 9, 0, tzinfo=UTC)


def test_meeting_accepts_python_field_names_and_naive_end_date_as_utc() -> None:
    meeting = Meeting(
        meeting_id="7",
        room_url="https://x.whereby.com/r",
        end_date=datetime(2030, 1, 1),
    )

    assert meeting.end_date.tzinfo is not None
    assert meeting.end_date == datetime(2030, 1, 1, tzinfo=UTC)


def test_malformed_success_body_raises_wherebyerror_not_validation_error() -> None:
    script = Script(ok({"meetingId": "1"}, 201))

    with client_for(script) as client, pytest.raises(WherebyError) as info:
        client.create_meeting(create_request())

    assert type(info.value) is WherebyError
    assert info.value.status_code == 201


# --------------------------------------------------------------------------- error mapping


@pytest.mark.parametrize(
    ("status", "error_class", "retryable"),
    [
        (400, InvalidRequestError, False),
        (401, AuthenticationError, False),
        (403, PermissionDeniedError, False),
        (404, NotFoundError, False),
        (409, InvalidRequestError, False),
        (422, InvalidRequestError, False),
        (429, RateLimitedError, True),
        (500, ServerError, True),
        (502, ServerError, True),
        (503, ServerError, True),
    ],
)
def test_status_maps_to_error_class(status: int, error_class: type[WherebyError], retryable: bool) -> None:
    script = Script(error(status, {"error": "nope"}))

    with (
        client_for(script, max_retries=0) as client,
        pytest.raises(WherebyError) as info,
    ):
        client.get_meeting("123")

    assert type(info.value) is error_class
    assert info.value.status_code == status
    assert info.value.retryable is retryable


def test_400_message_contains_wherebys_error_text() -> None:
    script = Script(error(400, {"error": '"endDate" must be in the future'}))

    with client_for(script) as client, pytest.raises(InvalidRequestError) as info:
        client.create_meeting(create_request())

    assert '"endDate" must be in the future' in str(info.value)
    assert "POST /v1/meetings" in str(info.value)


def test_make_status_error_falls_back_to_plain_text_body() -> None:
    response = httpx.Response(422, text="roomNamePrefix is invalid")

    err = make_status_error(response)

    assert isinstance(err, InvalidRequestError)
    assert "roomNamePrefix is invalid" in str(err)


def test_429_retry_after_from_header_and_not_retried() -> None:
    script = Script(
        error(
            429,
            {"error": "Rate limit", "data": {"msLeft": 38689}},
            headers={"Retry-After": "7"},
        )
    )

    with (
        client_for(script, max_retries=2) as client,
        pytest.raises(RateLimitedError) as info,
    ):
        client.get_meeting("123")

    assert info.value.retry_after == 7.0
    assert len(script.requests) == 1


def test_429_retry_after_from_ms_left_when_header_absent() -> None:
    body = {
        "error": "Rate limit active for throttle key: organization:1",
        "data": {"msLeft": 38689},
    }
    script = Script(error(429, body))

    with client_for(script) as client, pytest.raises(RateLimitedError) as info:
        client.delete_meeting("123")

    assert info.value.retry_after == pytest.approx(38.689)
    assert len(script.requests) == 1


def test_429_retry_after_defaults_to_sixty_seconds() -> None:
    err = make_status_error(httpx.Response(429, text="slow down"))

    assert isinstance(err, RateLimitedError)
    assert err.retry_after == 60.0


def test_429_retry_after_accepts_http_date() -> None:
    when = datetime.now(UTC) + timedelta(seconds=120)
    header = when.strftime("%a, %d %b %Y %H:%M:%S GMT")

    err = make_status_error(httpx.Response(429, headers={"Retry-After": header}))

    assert isinstance(err, RateLimitedError)
    assert 100 < err.retry_after <= 120


# --------------------------------------------------------------------------- retries


def test_get_retries_5xx_then_succeeds() -> None:
    script = Script(error(500), error(502), ok(MEETING_JSON))

    with client_for(script, max_retries=2) as client:
        meeting = client.get_meeting("91813546")

    assert meeting.meeting_id == "91813546"
    assert len(script.requests) == 3


def test_delete_retries_5xx_then_succeeds() -> None:
    script = Script(error(503), httpx.Response(204))

    with client_for(script) as client:
        assert client.delete_meeting("91813546") is True

    assert [r.method for r in script.requests] == ["DELETE", "DELETE"]


def test_get_gives_up_after_max_retries() -> None:
    script = Script(error(500), error(500), error(500), ok(MEETING_JSON))

    with client_for(script, max_retries=2) as client, pytest.raises(ServerError):
        client.get_meeting("1")

    assert len(script.requests) == 3


def test_max_retries_zero_means_one_attempt() -> None:
    script = Script(error(500), ok(MEETING_JSON))

    with client_for(script, max_retries=0) as client, pytest.raises(ServerError):
        client.get_meeting("1")

    assert len(script.requests) == 1


@pytest.mark.parametrize("failure", [httpx.ReadTimeout, httpx.ConnectError, httpx.RemoteProtocolError])
def test_get_retries_transport_errors(failure: type[httpx.RequestError]) -> None:
    script = Script(failure, ok(MEETING_JSON))

    with client_for(script) as client:
        assert client.get_meeting("1").meeting_id == "91813546"

    assert len(script.requests) == 2


def test_get_does_not_retry_404() -> None:
    script = Script(error(404, {"error": "Meeting not found"}), ok(MEETING_JSON))

    with client_for(script) as client, pytest.raises(NotFoundError):
        client.get_meeting("1")

    assert len(script.requests) == 1


def test_post_not_retried_on_5xx() -> None:
    script = Script(error(500), ok(MEETING_JSON, 201))

    with client_for(script) as client, pytest.raises(ServerError):
        client.create_meeting(create_request())

    assert len(script.requests) == 1


def test_post_not_retried_on_read_timeout() -> None:
    script = Script(httpx.ReadTimeout, ok(MEETING_JSON, 201))

    with client_for(script) as client, pytest.raises(APITimeoutError) as info:
        client.create_meeting(create_request())

    assert info.value.request_sent is True
    assert len(script.requests) == 1


def test_post_not_retried_when_connection_drops_after_sending() -> None:
    script = Script(httpx.RemoteProtocolError, ok(MEETING_JSON, 201))

    with client_for(script) as client, pytest.raises(APIConnectionError) as info:
        client.create_meeting(create_request())

    assert type(info.value) is APIConnectionError
    assert info.value.request_sent is True
    assert len(script.requests) == 1


@pytest.mark.parametrize("failure", [httpx.ConnectError, httpx.ConnectTimeout])
def test_post_retried_when_request_never_sent(
    failure: type[httpx.RequestError],
) -> None:
    script = Script(failure, ok(MEETING_JSON, 201))

    with client_for(script) as client:
        meeting = client.create_meeting(create_request())

    assert meeting.meeting_id == "91813546"
    assert len(script.requests) == 2


def test_post_connect_errors_give_up_after_max_retries() -> None:
    script = Script(httpx.ConnectError, httpx.ConnectError, httpx.ConnectError)

    with (
        client_for(script, max_retries=2) as client,
        pytest.raises(APIConnectionError) as info,
    ):
        client.create_meeting(create_request())

    assert info.value.request_sent is False
    assert info.value.status_code is None
    assert len(script.requests) == 3


def test_connect_timeout_is_a_timeout_with_request_not_sent() -> None:
    script = Script(httpx.ConnectTimeout)

    with (
        client_for(script, max_retries=0) as client,
        pytest.raises(APITimeoutError) as info,
    ):
        client.get_meeting("1")

    assert info.value.request_sent is False


def test_backoff_waits_grow_with_jitter_between_min_and_max(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sleeps: list[float] = []
    monkeypatch.setattr(whereby, "_sleep", sleeps.append)
    script = Script(*[error(500)] * 5)

    with (
        client_for(script, max_retries=4, retry_wait_min=0.2, retry_wait_max=1.0) as client,
        pytest.raises(ServerError),
    ):
        client.get_meeting("1")

    assert len(sleeps) == 4
    for n, slept in enumerate(sleeps, start=1):
        assert 0.2 <= slept <= min(0.2 * 2**n, 1.0)


# --------------------------------------------------------------------------- delete / get / list


@pytest.mark.parametrize(("status", "deleted"), [(204, True), (200, True), (404, False)])
def test_delete_reports_whether_it_deleted(status: int, deleted: bool) -> None:
    script = Script(httpx.Response(status))

    with client_for(script) as client:
        assert client.delete_meeting("91813546") is deleted

    assert script.paths == ["/v1/meetings/91813546"]


def test_get_meeting_sends_fields_and_quotes_the_id() -> None:
    script = Script(ok(MEETING_JSON))

    with client_for(script) as client:
        client.get_meeting("../x?y", fields=["hostRoomUrl", "viewerRoomUrl"])

    (sent,) = script.requests
    assert sent.url.raw_path.startswith(b"/v1/meetings/..%2Fx%3Fy?")
    assert sent.url.params["fields"] == "hostRoomUrl,viewerRoomUrl"


def test_list_follows_cursor_sends_prefix_filter_and_filters_client_side() -> None:
    def room(meeting_id: int, name: str) -> dict[str, Any]:
        return {**MEETING_JSON, "meetingId": meeting_id, "roomName": name}

    script = Script(
        ok({"results": [room(1, "/booking-1-a"), room(2, "/other-b")], "cursor": "c1"}),
        ok({"results": [room(3, "/booking-3-c")], "cursor": "c2"}),
        ok({"results": [], "cursor": None}),
    )

    with client_for(script) as client:
        ids = [m.meeting_id for m in client.list_meetings(room_name_prefix="booking-", page_size=2)]

    assert ids == ["1", "3"]
    params = [r.url.params for r in script.requests]
    assert [p.get("cursor") for p in params] == [None, "c1", "c2"]
    assert all(p["roomName[startsWith]"] == "/booking-" for p in params)
    assert all(p["limit"] == "2" for p in params)


def test_list_accepts_prefix_with_leading_slash() -> None:
    script = Script(ok({"results": [MEETING_JSON], "cursor": None}))

    with client_for(script) as client:
        meetings = list(client.list_meetings(room_name_prefix="/booking-42", fields=["hostRoomUrl"]))

    assert [m.room_name for m in meetings] == ["/booking-42-1a2b3c"]
    (sent,) = script.requests
    assert sent.url.params["roomName[startsWith]"] == "/booking-42"
    assert sent.url.params["fields"] == "hostRoomUrl"


def test_list_without_prefix_sends_no_filter_and_yields_everything() -> None:
    other = {**MEETING_JSON, "meetingId": "2", "roomName": "/zzz"}
    script = Script(ok({"results": [MEETING_JSON, other], "cursor": None}))

    with client_for(script) as client:
        assert [m.meeting_id for m in client.list_meetings()] == ["91813546", "2"]

    assert "roomName[startsWith]" not in script.requests[0].url.params


def test_list_stops_on_a_repeated_cursor_instead_of_looping_forever() -> None:
    page = ok({"results": [], "cursor": "same"})
    script = Script(page, ok({"results": [], "cursor": "same"}))

    with client_for(script) as client, pytest.raises(WherebyError, match="repeated"):
        list(client.list_meetings())

    assert len(script.requests) == 2


# --------------------------------------------------------------------------- hooks and logs


def test_hooks_run_per_attempt_with_points_and_outcome() -> None:
    points: list[tuple[str, int]] = []
    records: list[CallRecord] = []
    script = Script(
        error(500),
        ok(MEETING_JSON),  # GET retried once
        httpx.ReadTimeout,
        httpx.Response(204),  # DELETE retried once
        ok(MEETING_JSON, 201),  # POST
    )

    with client_for(
        script,
        before_request=lambda m, p: points.append((m, p)),
        on_call=records.append,
    ) as client:
        client.get_meeting("91813546")
        client.delete_meeting("91813546")
        client.create_meeting(create_request())

    assert points == [("GET", 1), ("GET", 1), ("DELETE", 2), ("DELETE", 2), ("POST", 3)]
    outcomes = [(r.method, r.path, r.status, r.error, r.meeting_id) for r in records]
    assert outcomes == [
        ("GET", "/meetings/91813546", 500, "ServerError", "91813546"),
        ("GET", "/meetings/91813546", 200, None, "91813546"),
        ("DELETE", "/meetings/91813546", None, "APITimeoutError", "91813546"),
        ("DELETE", "/meetings/91813546", 204, None, "91813546"),
        ("POST", "/meetings", 201, None, "91813546"),
    ]
    assert all(r.elapsed >= 0 for r in records)


def test_delete_of_missing_room_is_recorded_without_error() -> None:
    records: list[CallRecord] = []
    script = Script(httpx.Response(404))

    with client_for(script, on_call=records.append) as client:
        client.delete_meeting("5")

    assert [(r.status, r.error) for r in records] == [(404, None)]


def test_before_request_can_veto_a_call_before_anything_is_sent() -> None:
    class OverBudget(Exception):
        pass

    def limiter(method: str, points: int) -> None:
        raise OverBudget

    script = Script(ok(MEETING_JSON, 201))

    with (
        client_for(script, before_request=limiter) as client,
        pytest.raises(OverBudget),
    ):
        client.create_meeting(create_request())

    assert script.requests == []


def test_failing_on_call_hook_does_not_lose_a_created_room() -> None:
    def broken_audit(record: CallRecord) -> None:
        raise RuntimeError("audit store down")

    script = Script(ok(MEETING_JSON, 201))

    with client_for(script, on_call=broken_audit) as client:
        meeting = client.create_meeting(create_request())

    assert meeting.meeting_id == "91813546"
    assert len(script.requests) == 1


def test_one_debug_line_per_attempt(caplog: pytest.LogCaptureFixture) -> None:
    script = Script(error(502), ok(MEETING_JSON))

    with (
        caplog.at_level(logging.DEBUG, logger="worker.adapters.whereby"),
        client_for(script) as client,
    ):
        client.get_meeting("9")

    lines = [r.getMessage() for r in caplog.records if r.name == "worker.adapters.whereby"]
    assert len(lines) == 2
    assert "GET /meetings/9" in lines[0] and "502" in lines[0]
    assert "GET /meetings/9" in lines[1] and "200" in lines[1]


# --------------------------------------------------------------------------- the key never leaks


def _every_error() -> list[tuple[str, Reply]]:
    return [
        ("400", error(400, {"error": "bad"})),
        ("401", error(401, {"error": "unauthorized"})),
        ("403", error(403, {"error": "forbidden"})),
        ("404", error(404, {"error": "not found"})),
        ("429", error(429, {"error": "limit", "data": {"msLeft": 10}})),
        ("500", error(500, text="boom")),
        ("connect", httpx.ConnectError),
        ("connect-timeout", httpx.ConnectTimeout),
        ("read-timeout", httpx.ReadTimeout),
        ("dropped", httpx.RemoteProtocolError),
    ]


def test_api_key_never_appears_in_errors_client_or_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen_classes: set[type[WherebyError]] = set()
    caplog.set_level(logging.DEBUG)

    for _, reply in _every_error():
        script = Script(reply)
        client = client_for(script, max_retries=0)
        with pytest.raises(WherebyError) as info:
            client.get_meeting("1")
        client.close()
        err = info.value
        seen_classes.add(type(err))
        # The key was really sent, so its absence below means something.
        assert script.requests[0].headers["authorization"] == f"Bearer {API_KEY}"
        for text in (
            str(err),
            repr(err),
            str(err.__cause__),
            repr(err.__cause__),
            str(err.args),
        ):
            assert API_KEY not in text

    assert seen_classes == {
        InvalidRequestError,
        AuthenticationError,
        PermissionDeniedError,
        NotFoundError,
        RateLimitedError,
        ServerError,
        APIConnectionError,
        APITimeoutError,
    }
    client = client_for(Script())
    assert API_KEY not in repr(client)
    assert API_KEY not in str(client)
    assert API_KEY not in caplog.text
    assert "authorization" not in caplog.text.lower()


def test_invalid_api_key_is_rejected_without_echoing_it() -> None:
    bad_key = "secret-with\nnewline"

    with pytest.raises(ValueError) as info:
        WherebyClient(BASE_URL, bad_key)

    assert bad_key not in str(info.value)
    assert "secret" not in str(info.value)


def test_error_hierarchy_shape() -> None:
    assert issubclass(APITimeoutError, APIConnectionError)
    assert all(
        issubclass(cls, WherebyError)
        for cls in (
            APIConnectionError,
            RateLimitedError,
            AuthenticationError,
            PermissionDeniedError,
            NotFoundError,
            InvalidRequestError,
            ServerError,
        )
    )
