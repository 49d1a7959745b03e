"""Tests for the validation of what callers send (CONTRACT §2.1-§2.3, §2.6): a message per broken rule."""

from __future__ import annotations

import json
import pickle
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from worker.rules.validation import (
    MAX_METADATA_BYTES,
    BookingRef,
    InvalidRequest,
    ScheduleRequest,
    describe,
    problems,
    validate,
)

CALLER_PREFIX_MAX = 27

# The contract's own example call (§2), with a date far enough ahead to stay in the future.
EXAMPLE: dict[str, Any] = {
    "booking_id": "booking-8812",
    "start": "2096-12-01T09:00:00+01:00",
    "end": "2096-12-01T09:45:00+01:00",
    "room": {"room_mode": "group", "fields": ["hostRoomUrl"]},
    "notify": {"task": "bookings.room_event", "queue": "bookings"},
}


def schedule(**changes: Any) -> ScheduleRequest:
    kwargs = {**EXAMPLE, **changes}
    return validate(ScheduleRequest, (), kwargs, caller_prefix_max=CALLER_PREFIX_MAX, now=datetime.now(UTC))


def without(key: str) -> dict[str, Any]:
    return {k: v for k, v in EXAMPLE.items() if k != key}


def rejected(kwargs: dict[str, Any], args: tuple[Any, ...] = ()) -> str:
    with pytest.raises(InvalidRequest) as caught:
        validate(ScheduleRequest, args, kwargs, caller_prefix_max=CALLER_PREFIX_MAX, now=datetime.now(UTC))
    return str(caught.value)


def rejected_with(**changes: Any) -> str:
    return rejected({**EXAMPLE, **changes})


# --------------------------------------------------------------------------------------------
# What is accepted.


def test_the_contract_example_is_accepted() -> None:
    request = schedule()
    assert request.booking_id == "booking-8812"
    assert request.start == datetime(2096, 12, 1, 8, 0, tzinfo=UTC)
    assert request.end == datetime(2096, 12, 1, 8, 45, tzinfo=UTC)
    assert request.room.room_mode == "group"
    assert request.room.fields == ["hostRoomUrl"]
    assert request.notify is not None
    assert (request.notify.task, request.notify.queue) == ("bookings.room_event", "bookings")
    assert request.metadata == {}


def test_only_the_required_fields_are_needed() -> None:
    request = validate(
        ScheduleRequest,
        (),
        {"booking_id": "b-1", "start": "2096-01-01T10:00:00Z", "end": "2096-01-01T11:00:00Z"},
        caller_prefix_max=CALLER_PREFIX_MAX,
    )
    assert request.notify is None
    assert request.metadata == {}
    assert request.room.room_name_prefix is None


def test_explicit_nulls_for_optional_objects_are_accepted() -> None:
    request = schedule(room=None, notify=None, metadata=None)
    assert request.notify is None
    assert request.metadata == {}
    assert request.room.room_mode is None


def test_every_room_option_is_accepted() -> None:
    room = {
        "room_name_prefix": "clinic-7",
        "room_name_pattern": "human-short",
        "room_mode": "normal",
        "is_locked": True,
        "fields": ["viewerRoomUrl", "hostRoomUrl"],
        "template_type": "viewerMode",
    }
    options = schedule(room=room).room
    assert options.room_name_prefix == "clinic-7"
    assert options.room_name_pattern == "human-short"
    assert options.room_mode == "normal"
    assert options.is_locked is True
    assert set(options.fields or []) == {"hostRoomUrl", "viewerRoomUrl"}
    assert options.template_type == "viewerMode"


def test_booking_id_of_200_characters_is_accepted() -> None:
    assert schedule(booking_id="b" * 200).booking_id == "b" * 200


def test_metadata_is_kept_as_sent() -> None:
    metadata = {"patient": 7, "tags": ["a", "b"], "nested": {"ok": True}}
    assert schedule(metadata=metadata).metadata == metadata


# --------------------------------------------------------------------------------------------
# Times.


def test_naive_times_are_read_as_utc() -> None:
    request = schedule(start="2096-12-01T09:00:00", end="2096-12-01T09:45:00")
    assert request.start == datetime(2096, 12, 1, 9, 0, tzinfo=UTC)
    assert request.end == datetime(2096, 12, 1, 9, 45, tzinfo=UTC)
    assert request.start.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    ("start", "expected"),
    [
        ("2096-12-01T09:00:00+01:00", datetime(2096, 12, 1, 8, 0, tzinfo=UTC)),
        ("2096-12-01T09:00:00-05:30", datetime(2096, 12, 1, 14, 30, tzinfo=UTC)),
        ("2096-12-01T09:00:00Z", datetime(2096, 12, 1, 9, 0, tzinfo=UTC)),
    ],
)
def test_offsets_are_converted_to_utc(start: str, expected: datetime) -> None:
    request = schedule(start=start, end="2096-12-02T00:00:00Z")
    assert request.start == expected
    assert request.start.utcoffset() == timedelta(0)
    assert request.start.tzinfo == UTC


def test_start_in_the_past_is_accepted_when_end_is_ahead() -> None:
    # The room is then created at once (§2.1); only the end must lie ahead.
    now = datetime.now(UTC)
    request = schedule(
        start=(now - timedelta(minutes=10)).isoformat(), end=(now + timedelta(minutes=30)).isoformat()
    )
    assert request.start < now < request.end


@pytest.mark.parametrize("field", ["start", "end"])
def test_time_missing(field: str) -> None:
    message = rejected(without(field))
    assert field in message
    assert "required" in message


@pytest.mark.parametrize("field", ["start", "end"])
@pytest.mark.parametrize("value", ["tomorrow at nine", "2096-13-01T09:00:00Z", "01/12/2096 09:00", ""])
def test_time_not_iso(field: str, value: str) -> None:
    message = rejected_with(**{field: value})
    assert f"{field}:" in message
    assert "ISO-8601" in message


@pytest.mark.parametrize("field", ["start", "end"])
@pytest.mark.parametrize("value", [4_102_444_800, 4_102_444_800.0, None, ["2096-12-01T09:00:00Z"]])
def test_time_not_a_string(field: str, value: Any) -> None:
    message = rejected_with(**{field: value})
    assert f"{field}:" in message
    assert "string" in message


def test_a_bare_date_is_not_a_date_time() -> None:
    message = rejected_with(end="2096-12-01")
    assert "end:" in message
    assert "ISO-8601" in message


@pytest.mark.parametrize(
    "end", ["2096-12-01T09:00:00+01:00", "2096-12-01T08:59:59+01:00", "2096-12-01T07:00:00Z"]
)
def test_end_not_after_start(end: str) -> None:
    message = rejected_with(end=end)
    assert "end" in message
    assert "after start" in message


def test_the_moment_end_must_follow_comes_in_through_the_context() -> None:
    # The rules read no clock: the faces pass `now`, and `end` must come after that moment.
    end = datetime(2096, 12, 1, 9, 30, tzinfo=UTC)
    kwargs = {**EXAMPLE, "end": end.isoformat()}
    assert validate(ScheduleRequest, (), kwargs, now=end - timedelta(microseconds=1)).end == end
    with pytest.raises(InvalidRequest, match=r"^end: must be in the future$"):
        validate(ScheduleRequest, (), kwargs, now=end)


def test_end_in_the_past() -> None:
    now = datetime.now(UTC)
    message = rejected_with(
        start=(now - timedelta(hours=1)).isoformat(), end=(now - timedelta(seconds=1)).isoformat()
    )
    assert "end" in message
    assert "future" in message


def test_end_compared_in_utc_not_by_wall_clock() -> None:
    # 09:30+01:00 is 08:30 UTC: before a start of 09:00 UTC, although its wall clock reads later.
    message = rejected_with(start="2096-12-01T09:00:00Z", end="2096-12-01T09:30:00+01:00")
    assert "end" in message
    assert "after start" in message


# --------------------------------------------------------------------------------------------
# booking_id.


def test_booking_id_missing() -> None:
    message = rejected(without("booking_id"))
    assert "booking_id" in message
    assert "required" in message


@pytest.mark.parametrize(
    ("value", "rule"),
    [("", "at least 1"), ("b" * 201, "at most 200"), (8812, "string"), (None, "string"), (["b"], "string")],
)
def test_booking_id_invalid(value: Any, rule: str) -> None:
    message = rejected_with(booking_id=value)
    assert "booking_id" in message
    assert rule in message


# --------------------------------------------------------------------------------------------
# room.


def test_room_unknown_key() -> None:
    message = rejected_with(room={"room_mode": "group", "roomMode": "group"})
    assert "room.roomMode" in message
    assert "unknown" in message


@pytest.mark.parametrize("prefix", ["Clinic", "clinic_7", "clinic 7", "klinik-ü", "/clinic"])
def test_room_name_prefix_bad_characters(prefix: str) -> None:
    message = rejected_with(room={"room_name_prefix": prefix})
    assert "room.room_name_prefix" in message
    assert "pattern" in message


def test_room_name_prefix_must_leave_room_for_the_service_tag() -> None:
    assert schedule(room={"room_name_prefix": "a" * CALLER_PREFIX_MAX}).room.room_name_prefix == "a" * 27
    message = rejected_with(room={"room_name_prefix": "a" * (CALLER_PREFIX_MAX + 1)})
    assert "room.room_name_prefix" in message
    assert f"at most {CALLER_PREFIX_MAX}" in message


def test_room_name_prefix_limit_comes_from_the_caller() -> None:
    room = {"room_name_prefix": "a" * 21}
    validate(ScheduleRequest, (), {**EXAMPLE, "room": room}, caller_prefix_max=21)
    with pytest.raises(InvalidRequest, match=r"room\.room_name_prefix: must be at most 20"):
        validate(ScheduleRequest, (), {**EXAMPLE, "room": room}, caller_prefix_max=20)


@pytest.mark.parametrize(
    ("room", "field", "rule"),
    [
        ({"room_name_pattern": "short"}, "room.room_name_pattern", "human-short"),
        ({"room_name_pattern": "UUID"}, "room.room_name_pattern", "uuid"),
        ({"room_mode": "large"}, "room.room_mode", "group"),
        ({"fields": ["hostRoomUrl", "hostUrl"]}, "room.fields", "viewerRoomUrl"),
        ({"fields": "hostRoomUrl"}, "room.fields", "list"),
        ({"template_type": "hostMode"}, "room.template_type", "viewerMode"),
        ({"is_locked": "true"}, "room.is_locked", "boolean"),
        ({"is_locked": 1}, "room.is_locked", "boolean"),
        ({"room_name_prefix": 7}, "room.room_name_prefix", "string"),
    ],
)
def test_room_option_invalid(room: dict[str, Any], field: str, rule: str) -> None:
    message = rejected_with(room=room)
    assert field in message
    assert rule in message


@pytest.mark.parametrize("room", ["group", ["room_mode", "group"], 1])
def test_room_not_an_object(room: Any) -> None:
    message = rejected_with(room=room)
    assert "room" in message
    assert "dictionary" in message


# --------------------------------------------------------------------------------------------
# notify.


@pytest.mark.parametrize("missing", ["task", "queue"])
def test_notify_missing_key(missing: str) -> None:
    notify = {k: v for k, v in EXAMPLE["notify"].items() if k != missing}
    message = rejected_with(notify=notify)
    assert f"notify.{missing}" in message
    assert "required" in message


def test_notify_extra_key() -> None:
    message = rejected_with(notify={**EXAMPLE["notify"], "countdown": 5})
    assert "notify.countdown" in message
    assert "unknown" in message


@pytest.mark.parametrize(
    ("notify", "field", "rule"),
    [
        ({"task": "", "queue": "q"}, "notify.task", "at least 1"),
        ({"task": "t", "queue": 5}, "notify.queue", "string"),
    ],
)
def test_notify_values_invalid(notify: dict[str, Any], field: str, rule: str) -> None:
    message = rejected_with(notify=notify)
    assert field in message
    assert rule in message


def test_notify_not_an_object() -> None:
    message = rejected_with(notify="bookings.room_event")
    assert "notify" in message
    assert "dictionary" in message


# --------------------------------------------------------------------------------------------
# metadata.


@pytest.mark.parametrize("metadata", [["a", 1], "patient=7", 7, True])
def test_metadata_not_an_object(metadata: Any) -> None:
    message = rejected_with(metadata=metadata)
    assert "metadata" in message
    assert "object" in message


def _metadata_of_size(size: int) -> dict[str, str]:
    # '{"a":""}' is 8 bytes; the rest is the value.
    metadata = {"a": "x" * (size - 8)}
    assert len(json.dumps(metadata, separators=(",", ":")).encode()) == size
    return metadata


def test_metadata_of_exactly_4_kib_is_accepted() -> None:
    assert MAX_METADATA_BYTES == 4096
    assert schedule(metadata=_metadata_of_size(4096)).metadata["a"] == "x" * 4088


def test_metadata_over_4_kib() -> None:
    message = rejected_with(metadata=_metadata_of_size(4097))
    assert "metadata" in message
    assert "4096" in message


# --------------------------------------------------------------------------------------------
# The call itself.


def test_unknown_top_level_kwarg() -> None:
    message = rejected_with(room_mode="group")
    assert "room_mode" in message
    assert "unknown" in message


def test_positional_arguments() -> None:
    message = rejected({}, args=("booking-8812", EXAMPLE["start"], EXAMPLE["end"]))
    assert "keyword" in message
    assert "positional" in message


def test_every_broken_rule_is_reported_at_once() -> None:
    message = rejected({**EXAMPLE, "booking_id": "", "room": {"room_mode": "huge"}, "colour": "red"})
    assert "booking_id" in message
    assert "room.room_mode" in message
    assert "colour: unknown field" in message


def test_invalid_request_is_a_value_error() -> None:
    # A ValueError subclass: Celery records it with its message for result.get() and Flower.
    assert issubclass(InvalidRequest, ValueError)


# --------------------------------------------------------------------------------------------
# BookingRef (rooms.cancel_meeting, rooms.get_meeting).


def test_booking_ref_accepted() -> None:
    assert validate(BookingRef, (), {"booking_id": "booking-8812"}).booking_id == "booking-8812"


@pytest.mark.parametrize(
    ("kwargs", "field", "rule"),
    [
        ({}, "booking_id", "required"),
        ({"booking_id": ""}, "booking_id", "at least 1"),
        ({"booking_id": "b" * 201}, "booking_id", "at most 200"),
        ({"booking_id": 8812}, "booking_id", "string"),
        ({"booking_id": "b", "reason": "patient ill"}, "reason", "unknown"),
    ],
)
def test_booking_ref_invalid(kwargs: dict[str, Any], field: str, rule: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        validate(BookingRef, (), kwargs)
    assert field in str(caught.value)
    assert rule in str(caught.value)


def test_booking_ref_positional() -> None:
    with pytest.raises(InvalidRequest, match="keyword"):
        validate(BookingRef, ("booking-8812",), {})


# --------------------------------------------------------------------------------------------
# Characters the store cannot keep: NUL (PostgreSQL refuses it in text) and lone surrogates (no
# UTF-8 encoding). Refused in every string field, naming it, the same on SQLite and PostgreSQL.

NUL_RULE = "must not contain the NUL character (U+0000)"
UNSTORABLE = [("nul", "\x00", NUL_RULE), ("surrogate", "\ud800", "lone surrogate (U+D800)")]


@pytest.fixture(params=UNSTORABLE, ids=[case[0] for case in UNSTORABLE])
def bad(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(the character, the words of the rule it breaks)."""
    _name, char, rule = request.param
    return char, rule


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"booking_id": "booking-{}-8812"}, "booking_id"),
        ({"booking_id": "{}"}, "booking_id"),
        ({"notify": {"task": "bookings.room_event{}", "queue": "bookings"}}, "notify.task"),
        ({"notify": {"task": "bookings.room_event", "queue": "{}bookings"}}, "notify.queue"),
        ({"room": {"room_name_prefix": "clinic{}"}}, "room.room_name_prefix"),
        ({"room": {"room_name_pattern": "uuid{}"}}, "room.room_name_pattern"),
        ({"room": {"room_mode": "group{}"}}, "room.room_mode"),
        ({"room": {"template_type": "{}viewerMode"}}, "room.template_type"),
        ({"start": "2096-12-01T09:00:00Z{}"}, "start"),
        ({"end": "2096-12-01T09:45:00{}Z"}, "end"),
    ],
)
def test_unstorable_character_in_a_string_field(
    bad: tuple[str, str], changes: dict[str, Any], field: str
) -> None:
    char, rule = bad
    sent = json.loads(json.dumps(changes).replace("{}", json.dumps(char)[1:-1]))
    message = rejected_with(**sent)
    assert message.startswith(f"{field}: must not contain")
    assert rule in message
    assert ";" not in message  # this rule alone, not the field's other rules about the same text
    assert "\x00" not in message and "\ud800" not in message  # the message itself is safe to store and print


@pytest.mark.parametrize(
    ("metadata", "field"),
    [
        ({"notes": "{}"}, "metadata.notes"),
        ({"notes": ["fine", "x{}y"]}, "metadata.notes.1"),
        ({"a": {"b": [{"c": "{}"}]}}, "metadata.a.b.0.c"),
        ({"a": {"b": [1, True, None, 2.5, "{}"]}}, "metadata.a.b.4"),
    ],
)
def test_unstorable_character_in_a_metadata_value_names_its_path(
    bad: tuple[str, str], metadata: dict[str, Any], field: str
) -> None:
    char, rule = bad
    sent = json.loads(json.dumps(metadata).replace("{}", json.dumps(char)[1:-1]))
    message = rejected_with(metadata=sent)
    assert message.startswith(f"{field}: must not contain")
    assert rule in message


def test_unstorable_character_in_a_metadata_key_names_the_object_and_the_key(bad: tuple[str, str]) -> None:
    char, rule = bad
    message = rejected_with(metadata={"notes": {f"to{char}do": "call back"}})
    assert message.startswith(f"metadata.notes: key {f'to{char}do'!r} must not contain")
    assert rule in message
    assert char not in message  # shown escaped


def test_metadata_example_from_the_issue() -> None:
    message = rejected_with(metadata={"notes": ["\x00"]})
    assert message == "metadata.notes.0: must not contain the NUL character (U+0000)"


def test_every_unstorable_place_is_reported_at_once() -> None:
    message = rejected_with(
        booking_id="b\x00",
        notify={"task": "t\x00", "queue": "q"},
        metadata={"a": "\x00", "b": ["ok", "\ud800"]},
    )
    assert message.split("; ") == [
        "booking_id: must not contain the NUL character (U+0000)",
        "notify.task: must not contain the NUL character (U+0000)",
        "metadata.a: must not contain the NUL character (U+0000)",
        "metadata.b.1: must not contain a lone surrogate (U+D800): not valid Unicode text",
    ]


def test_an_unknown_kwarg_with_a_nul_in_its_name_is_named_escaped() -> None:
    message = rejected_with(**{"prio\x00rity": "high"})
    assert message == "'prio\\x00rity': unknown field"


@pytest.mark.parametrize(
    "text",
    ["booking \U0001f600 ünïcödé", "tab\tand\nnewline", "\x01\x1f\x7f control characters", "\ufffe\uffff"],
)
def test_every_other_character_is_accepted(text: str) -> None:
    # Only what the store cannot keep is refused: other control characters and astral planes are text.
    request = schedule(
        booking_id=text,
        notify={"task": text, "queue": text},
        metadata={text: [text, {text: text}]},
    )
    assert request.booking_id == text
    assert request.notify is not None and (request.notify.task, request.notify.queue) == (text, text)
    assert request.metadata == {text: [text, {text: text}]}


@pytest.mark.parametrize("char", ["\x00", "\udfff"])
def test_booking_ref_unstorable_character(char: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        validate(BookingRef, (), {"booking_id": f"booking{char}8812"})
    assert str(caught.value).startswith("booking_id: must not contain")


def test_problems_give_field_and_rule_pairs() -> None:
    # The HTTP face reports `{"field", "rule"}` pairs (CONTRACT §4): the same ones as the message.
    with pytest.raises(ValidationError) as caught:
        ScheduleRequest.model_validate(
            {**EXAMPLE, "booking_id": "b\x00", "metadata": {"n": ["\x00"]}, "colour": "red"},
            context={"caller_prefix_max": CALLER_PREFIX_MAX},
        )
    assert sorted(problems(caught.value)) == [
        ("booking_id", "must not contain the NUL character (U+0000)"),
        ("colour", "unknown field"),
        ("metadata.n.0", "must not contain the NUL character (U+0000)"),
    ]


def test_invalid_request_carries_its_pairs_and_travels_as_the_contracts_text() -> None:
    # The HTTP face reads the pairs; a Celery caller gets the text alone (the error's only arg), and
    # rebuilds the error from it as Celery does (`cls(*args)`), pickled or not.
    with pytest.raises(InvalidRequest) as caught:
        schedule(colour="red", room={"room_mode": "x"})
    error = caught.value
    assert sorted(error.problems) == [
        ("colour", "unknown field"),
        ("room.room_mode", "Input should be 'normal' or 'group'"),
    ]
    assert error.args == (describe(error.problems),)
    assert "colour: unknown field" in str(error) and "room.room_mode: Input should be" in str(error)
    for rebuilt in (type(error)(*error.args), pickle.loads(pickle.dumps(error))):
        assert type(rebuilt) is InvalidRequest and str(rebuilt) == str(error)


def test_a_rule_about_one_field_names_that_field_not_its_text() -> None:
    # `end: must be after start` is a model's rule: it comes out as its own pair, not as text the
    # HTTP face would have to split again.
    with pytest.raises(ValidationError) as caught:
        ScheduleRequest.model_validate({**EXAMPLE, "end": EXAMPLE["start"]})
    assert problems(caught.value) == [("end", "must be after start")]
    with pytest.raises(InvalidRequest) as refused:
        schedule(end="2000-01-01T00:00:00Z", start="1999-01-01T00:00:00Z")
    assert refused.value.problems == (("end", "must be in the future"),)
    assert str(refused.value) == "end: must be in the future"


def test_positional_arguments_are_a_rule_about_the_whole_call() -> None:
    with pytest.raises(InvalidRequest) as caught:
        validate(BookingRef, ("booking-8812",), {})
    rule = "arguments must be sent as keyword arguments (kwargs), not positionally"
    assert caught.value.problems == (("", rule),)
    assert str(caught.value) == rule
