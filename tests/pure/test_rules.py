"""Tests for the lifecycle rules (worker/rules/lifecycle.py): pure functions, no broker, no database."""

from __future__ import annotations

import random
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from config.settings import Settings
from worker.adapters import whereby
from worker.rules import lifecycle, retry
from worker.rules.lifecycle import GiveUp, Retry
from worker.rules.validation import InvalidRequest, ScheduleRequest, validate
from worker.store import deployment

NOW = datetime(2096, 3, 1, 12, 0, tzinfo=UTC)
FAR_END = NOW + timedelta(days=1)
WHEREBY_NAME_LIMIT = 39  # roomNamePrefix is [a-z0-9-]{0,39}


@pytest.fixture(autouse=True)
def sandbox_url(monkeypatch: pytest.MonkeyPatch) -> None:
    # Settings also read the environment: point at a sandbox so no API key is required.
    monkeypatch.setenv("WHEREBY_API_URL", "http://127.0.0.1:8088/v1")
    monkeypatch.delenv("WHEREBY_API_KEY", raising=False)
    for name in (
        "CREATE_LEAD_SECONDS",
        "DELETE_GRACE_SECONDS",
        "ROOM_PREFIX",
        "MAX_ATTEMPTS",
        "RETRY_BASE_SECONDS",
        "RETRY_MAX_SECONDS",
    ):
        monkeypatch.delenv(f"ROOMKEEPER_{name}", raising=False)


def make_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "create_lead_seconds": 900,
        "delete_grace_seconds": 0,
        "room_prefix": "rk",
        "max_attempts": 8,
        "retry_base_seconds": 2.0,
        "retry_max_seconds": 300.0,
    }
    values.update(overrides)
    return Settings(**values)


def status_error(status: int, **headers: str) -> whereby.WherebyError:
    return whereby.make_status_error(httpx.Response(status, headers=headers, json={"error": "nope"}))


def server_error() -> whereby.WherebyError:
    return status_error(503)


def connection_error() -> whereby.WherebyError:
    return whereby.APIConnectionError("POST /meetings: ConnectError: refused", request_sent=False)


# --------------------------------------------------------------------------------------------
# plan()


def test_plan_creates_one_lead_before_start_and_ends_one_grace_after_end() -> None:
    start = datetime(2096, 12, 1, 8, 0, tzinfo=UTC)
    end = datetime(2096, 12, 1, 8, 45, tzinfo=UTC)
    create_at, room_end = lifecycle.plan(
        start, end, make_settings(create_lead_seconds=600, delete_grace_seconds=120)
    )
    assert create_at == datetime(2096, 12, 1, 7, 50, tzinfo=UTC)
    assert room_end == datetime(2096, 12, 1, 8, 47, tzinfo=UTC)


def test_plan_with_the_default_lead_and_grace() -> None:
    start = datetime(2096, 12, 1, 8, 0, tzinfo=UTC)
    end = datetime(2096, 12, 1, 8, 45, tzinfo=UTC)
    create_at, room_end = lifecycle.plan(start, end, Settings())
    assert create_at == start - timedelta(minutes=15)
    assert room_end == end


def test_plan_with_no_lead_creates_at_start() -> None:
    start = datetime(2096, 12, 1, 8, 0, tzinfo=UTC)
    create_at, _ = lifecycle.plan(start, start + timedelta(hours=1), make_settings(create_lead_seconds=0))
    assert create_at == start


# --------------------------------------------------------------------------------------------
# Room names


def test_new_tag_is_eight_lowercase_alphanumerics() -> None:
    for _ in range(200):
        assert re.fullmatch(r"[a-z0-9]{8}", deployment.new_tag())


def test_new_tag_varies() -> None:
    tags = {deployment.new_tag() for _ in range(100)}
    assert len(tags) == 100


def test_room_name_prefix_puts_the_service_prefix_identity_and_tag_first() -> None:
    name = deployment.room_name_prefix("rk", "k3p9x", "a1b2c3d4", "clinic-7")
    assert name == "rk-k3p9x-a1b2c3d4-clinic-7"
    assert deployment.room_name_prefix("rk", "k3p9x", "a1b2c3d4", None).startswith("rk-k3p9x-a1b2c3d4-")
    assert deployment.room_name_prefix("rk", "k3p9x", "a1b2c3d4", "") == "rk-k3p9x-a1b2c3d4-"


@pytest.mark.parametrize(
    ("room_name", "expected"),
    [
        ("/rk-k3p9x-a1b2c3d4-clinic-7-0f3a", deployment.RoomName("k3p9x", "a1b2c3d4")),
        ("/rk-k3p9x-a1b2c3d4-", deployment.RoomName("k3p9x", "a1b2c3d4")),
        # Named before deployments had identities: the tag only.
        ("/rk-a1b2c3d4-clinic-7-0f3a", deployment.RoomName(None, "a1b2c3d4")),
        ("/rk-a1b2c3d4-b5b5b-0f3a", deployment.RoomName(None, "a1b2c3d4")),
        ("/other-k3p9x-a1b2c3d4-", None),
        ("/rk-short-x", None),
        ("/rkk3p9x-a1b2c3d4-", None),
    ],
)
def test_room_names_are_read_back_into_identity_and_tag(
    room_name: str, expected: deployment.RoomName | None
) -> None:
    assert deployment.parse(room_name, "rk") == expected


@pytest.mark.parametrize("service_prefix", ["rk", "r", "clinic12", "abcdefgh"])
def test_room_name_prefix_fits_whereby_for_the_longest_caller_prefix(service_prefix: str) -> None:
    settings = make_settings(room_prefix=service_prefix)
    longest = "c" * settings.caller_prefix_max
    name = deployment.room_name_prefix(settings.room_prefix, "k3p9x", deployment.new_tag(), longest)
    assert len(name) <= WHEREBY_NAME_LIMIT
    assert re.fullmatch(r"[a-z0-9-]{0,39}", name)
    assert name.startswith(f"{service_prefix}-")
    assert name.endswith(longest)


def test_caller_prefix_max_is_what_the_request_validation_enforces() -> None:
    # The longest prefix a caller may send, tagged by the service, still fits in 39 characters;
    # one character more is refused before anything reaches Whereby.
    settings = make_settings()
    assert settings.caller_prefix_max == 21
    kwargs = {"booking_id": "b", "start": "2096-01-01T10:00:00Z", "end": "2096-01-01T11:00:00Z"}
    longest = "p" * settings.caller_prefix_max
    request = validate(
        ScheduleRequest,
        (),
        {**kwargs, "room": {"room_name_prefix": longest}},
        caller_prefix_max=settings.caller_prefix_max,
    )
    name = deployment.room_name_prefix(
        settings.room_prefix, "k3p9x", deployment.new_tag(), request.room.room_name_prefix
    )
    assert len(name) == WHEREBY_NAME_LIMIT
    with pytest.raises(InvalidRequest, match="room_name_prefix"):
        validate(
            ScheduleRequest,
            (),
            {**kwargs, "room": {"room_name_prefix": longest + "p"}},
            caller_prefix_max=settings.caller_prefix_max,
        )


# --------------------------------------------------------------------------------------------
# retry.backoff(), with the jitter drawn by the caller


def test_backoff_stays_between_half_and_all_of_the_ceiling() -> None:
    rng = random.Random(1234)
    for attempt in range(1, 15):
        ceiling = min(300.0, 2.0 * 2 ** (attempt - 1))
        for _ in range(50):
            delay = retry.backoff(attempt, 2.0, 300.0, rng.random())
            assert ceiling / 2 <= delay <= ceiling


def test_backoff_grows_exponentially() -> None:
    rng = random.Random(7)
    delays = [retry.backoff(attempt, 1.0, 10_000.0, rng.random()) for attempt in range(1, 12)]
    assert delays == sorted(delays)
    # Two attempts on, the smallest possible delay is twice the largest possible one before.
    for earlier, later in zip(delays, delays[2:], strict=False):
        assert later >= 2 * earlier
    assert 512 <= delays[-1] <= 1024


def test_backoff_first_attempt_uses_the_base() -> None:
    rng = random.Random(3)
    assert all(1.0 <= retry.backoff(1, 2.0, 300.0, rng.random()) <= 2.0 for _ in range(100))


@pytest.mark.parametrize("attempt", [9, 10, 20, 60, 100])
def test_backoff_is_capped(attempt: int) -> None:
    rng = random.Random(attempt)
    delays = [retry.backoff(attempt, 2.0, 300.0, rng.random()) for _ in range(200)]
    assert all(150.0 <= delay <= 300.0 for delay in delays)


def test_backoff_is_jittered_and_reproducible_with_a_seed() -> None:
    first = [retry.backoff(5, 2.0, 300.0, random.Random(42).random()) for _ in range(3)]
    assert first[0] == first[1] == first[2]
    rng = random.Random(42)
    spread = {retry.backoff(5, 2.0, 300.0, rng.random()) for _ in range(20)}
    assert len(spread) == 20


# --------------------------------------------------------------------------------------------
# after_create_error()


@pytest.mark.parametrize("status", [400, 403, 422])
def test_create_refused_by_whereby_gives_up_at_once(status: int) -> None:
    decision = lifecycle.after_create_error(status_error(status), 1, NOW, FAR_END, make_settings())
    assert isinstance(decision, GiveUp)
    assert str(status) in decision.reason


@pytest.mark.parametrize(
    "error",
    [
        status_error(500),
        status_error(502),
        status_error(503),
        whereby.APIConnectionError("POST /meetings: ConnectError: refused", request_sent=False),
        whereby.APITimeoutError("POST /meetings: ReadTimeout: timed out", request_sent=True),
    ],
    ids=["500", "502", "503", "connect", "timeout"],
)
def test_create_transient_failure_retries_later(error: whereby.WherebyError) -> None:
    settings = make_settings()
    decision = lifecycle.after_create_error(error, 1, NOW, FAR_END, settings)
    assert isinstance(decision, Retry)
    assert NOW + timedelta(seconds=1) <= decision.at <= NOW + timedelta(seconds=2)
    assert type(error).__name__ in decision.reason


def test_create_retries_wait_longer_each_attempt() -> None:
    settings = make_settings(max_attempts=20)
    waits = [lifecycle.after_create_error(server_error(), n, NOW, FAR_END, settings) for n in (1, 3, 5, 7)]
    assert all(isinstance(w, Retry) for w in waits)
    ats = [w.at for w in waits if isinstance(w, Retry)]
    assert ats == sorted(ats)
    assert ats[-1] - NOW >= timedelta(seconds=64)  # attempt 7: between 64 and 128 s


@pytest.mark.parametrize("error", [server_error(), connection_error()], ids=["5xx", "connect"])
def test_create_never_gives_up_on_a_transient_failure_before_the_end(error: whereby.WherebyError) -> None:
    """Attempts are not counted out: only the meeting's end gives up on a streak of failures."""
    settings = make_settings(max_attempts=4)
    for attempts in (4, 12, 40):
        assert isinstance(lifecycle.after_create_error(error, attempts, NOW, FAR_END, settings), Retry)


# (seconds to the start, attempts so far) -> the retry lands within (low, high) seconds from now.
STREAK = [
    (5.0, 1, (0.5, 1.5)),  # near the start: within a second or so …
    (5.0, 3, (0.5, 1.5)),  # … however long the streak
    (3.0, 8, (0.5, 1.5)),
    (-30.0, 6, (0.5, 1.5)),  # past the start, the meeting waits for its room: just as soon
    (60.0, 9, (15.0, 30.0)),  # further out: backoff, but at most half the time left …
    (600.0, 1, (1.0, 2.0)),  # … and the plain backoff when that is shorter
    (900.0, 12, (150.0, 300.0)),  # the backoff cap rules here
]


@pytest.mark.parametrize(("to_start", "attempts", "window"), STREAK)
def test_create_retries_close_in_on_the_start_and_never_wait_past_it(
    to_start: float, attempts: int, window: tuple[float, float]
) -> None:
    settings = make_settings(retry_base_seconds=2.0, retry_max_seconds=300.0)
    start = NOW + timedelta(seconds=to_start)
    for _ in range(20):  # jittered: every draw within the window
        decision = lifecycle.after_create_error(server_error(), attempts, NOW, FAR_END, settings, start)
        assert isinstance(decision, Retry)
        waited = (decision.at - NOW).total_seconds()
        assert window[0] <= waited <= window[1], (to_start, attempts, waited)
        if to_start > 1.5:
            assert decision.at < start


def test_a_streak_of_failures_before_the_start_still_leaves_attempts_before_it() -> None:
    """Attempt after attempt failing from 5 s before the start: the room is still tried again
    within seconds, several times before the start, and never given up while the meeting runs."""
    settings = make_settings(retry_base_seconds=2.0, retry_max_seconds=300.0, max_attempts=4)
    start, end = NOW + timedelta(seconds=5), NOW + timedelta(minutes=30)
    now, attempts, before_start = NOW, 0, 0
    while now < start + timedelta(minutes=5):
        attempts += 1
        decision = lifecycle.after_create_error(server_error(), attempts, now, end, settings, start)
        assert isinstance(decision, Retry)
        assert (decision.at - now).total_seconds() <= 1.5
        now = decision.at
        before_start += now < start
    assert before_start >= 3


def test_create_gives_up_when_the_retry_would_land_after_the_room_end() -> None:
    settings = make_settings(retry_base_seconds=60.0)
    decision = lifecycle.after_create_error(server_error(), 1, NOW, NOW + timedelta(seconds=20), settings)
    assert isinstance(decision, GiveUp)
    assert "ended" in decision.reason


def test_create_429_waits_retry_after_without_spending_an_attempt() -> None:
    settings = make_settings(max_attempts=4)
    error = status_error(429, **{"Retry-After": "30"})
    assert isinstance(error, whereby.RateLimitedError)
    # Even with every attempt spent, a rate limit is not the meeting's failure.
    for attempts in (1, 4):
        decision = lifecycle.after_create_error(error, attempts, NOW, FAR_END, settings)
        assert isinstance(decision, Retry)
        assert NOW + timedelta(seconds=30) <= decision.at <= NOW + timedelta(seconds=31)


def test_create_429_gives_up_when_the_wait_outlasts_the_room() -> None:
    error = whereby.RateLimitedError("429 Too Many Requests", retry_after=600)
    decision = lifecycle.after_create_error(error, 1, NOW, NOW + timedelta(minutes=5), make_settings())
    assert isinstance(decision, GiveUp)


# --------------------------------------------------------------------------------------------
# outcome_unknown(): may a failed POST have made a room?


def _post_failure(reply: httpx.Response | Exception) -> whereby.WherebyError:
    """The error the real client raises when POST /meetings meets this reply."""

    def handler(request: httpx.Request) -> httpx.Response:
        if isinstance(reply, Exception):
            raise reply
        return reply

    client = whereby.WherebyClient(
        "https://api.whereby.test/v1", "k-test", transport=httpx.MockTransport(handler), max_retries=0
    )
    body = whereby.CreateMeetingRequest(end_date=FAR_END)
    with client, pytest.raises(whereby.WherebyError) as caught:
        client.create_meeting(body)
    return caught.value


@pytest.mark.parametrize(
    ("reply", "unknown"),
    [
        (httpx.Response(500, json={"error": "boom"}), True),
        (httpx.Response(503, text="unavailable"), True),
        (httpx.ReadTimeout("read timed out"), True),
        (httpx.WriteTimeout("write timed out"), True),
        (httpx.RemoteProtocolError("server disconnected"), True),
        (httpx.ConnectError("connection refused"), False),
        (httpx.ConnectTimeout("connect timed out"), False),
        (httpx.Response(400, json={"error": "bad endDate"}), False),
        (httpx.Response(429, headers={"Retry-After": "5"}), False),
    ],
    ids=[
        "500",
        "503",
        "read-timeout",
        "write-timeout",
        "disconnected",
        "connect-refused",
        "connect-timeout",
        "400",
        "429",
    ],
)
def test_outcome_unknown(reply: httpx.Response | Exception, unknown: bool) -> None:
    assert lifecycle.outcome_unknown(_post_failure(reply)) is unknown


def test_outcome_unknown_from_the_error_constructors() -> None:
    assert lifecycle.outcome_unknown(whereby.ServerError("502 Bad Gateway", status_code=502)) is True
    assert lifecycle.outcome_unknown(whereby.APITimeoutError("ReadTimeout", request_sent=True)) is True
    assert lifecycle.outcome_unknown(whereby.APIConnectionError("ConnectError", request_sent=False)) is False
    assert lifecycle.outcome_unknown(whereby.APITimeoutError("ConnectTimeout", request_sent=False)) is False
    assert lifecycle.outcome_unknown(whereby.InvalidRequestError("400", status_code=400)) is False


# --------------------------------------------------------------------------------------------
# after_delete_error(): deletions never give up


@pytest.mark.parametrize(
    "error",
    [status_error(400), status_error(401), status_error(403), status_error(500), connection_error()],
    ids=["400", "401", "403", "500", "connect"],
)
@pytest.mark.parametrize("attempts", [1, 8, 50, 100])
def test_delete_always_retries_later(error: whereby.WherebyError, attempts: int) -> None:
    settings = make_settings()
    at = lifecycle.after_delete_error(error, attempts, NOW, settings)
    assert isinstance(at, datetime)
    assert NOW < at <= NOW + timedelta(seconds=settings.retry_max_seconds)


def test_delete_429_waits_retry_after() -> None:
    at = lifecycle.after_delete_error(status_error(429, **{"Retry-After": "45"}), 3, NOW, make_settings())
    assert NOW + timedelta(seconds=45) <= at <= NOW + timedelta(seconds=46)


def test_delete_retries_even_after_very_many_attempts() -> None:
    settings = make_settings(retry_base_seconds=2.0, retry_max_seconds=30.0)
    at = lifecycle.after_delete_error(server_error(), 1025, NOW, settings)
    assert NOW < at <= NOW + timedelta(seconds=30)


# --------------------------------------------------------------------------------------------
# The rules read a failed call by its attributes, and draw their jitter from their inputs.


def test_jitter_is_a_pure_function_of_its_inputs() -> None:
    draws = {lifecycle.jitter("k", attempt, NOW) for attempt in range(200)}
    assert len(draws) == 200 and all(0.0 <= d < 1.0 for d in draws)
    assert lifecycle.jitter("k", 3, NOW) == lifecycle.jitter("k", 3, NOW)
    assert lifecycle.jitter("k", 3, NOW) != lifecycle.jitter("k", 3, NOW + timedelta(microseconds=1))
    same = lifecycle.after_create_error(server_error(), 3, NOW, FAR_END, make_settings(), key="b-1")
    assert same == lifecycle.after_create_error(server_error(), 3, NOW, FAR_END, make_settings(), key="b-1")


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (status_error(429), lifecycle.RATE_LIMITED),
        (status_error(401), lifecycle.AUTHENTICATION),
        (status_error(403), lifecycle.PERMISSION_DENIED),
        (status_error(404), lifecycle.NOT_FOUND),
        (status_error(422), lifecycle.INVALID_REQUEST),
        (status_error(503), lifecycle.SERVER),
        (whereby.APITimeoutError("ReadTimeout", request_sent=True), lifecycle.CONNECTION),
    ],
)
def test_each_whereby_error_names_its_kind(error: whereby.WherebyError, kind: str) -> None:
    assert error.kind == kind


def test_the_point_budget_is_waited_out_like_a_rate_limit() -> None:
    from worker.adapters.budget import BudgetExhausted

    error = BudgetExhausted(12.0)
    assert not lifecycle.counts_as_attempt(error)
    decision = lifecycle.after_create_error(error, 1, NOW, FAR_END, make_settings())
    assert isinstance(decision, Retry)
    assert NOW + timedelta(seconds=12) <= decision.at <= NOW + timedelta(seconds=13)
