"""The retry, delivery and feed-sync rules (worker/rules/retry.py, delivery.py, feeds.py) as tables:
pure functions of (facts, outcome, now, jitter), no broker, no database."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest

from worker.rules import delivery, feeds, retry

NOW = datetime(2096, 3, 1, 12, 0, tzinfo=UTC)
WINDOW = timedelta(hours=24)
HORIZON = NOW + timedelta(seconds=6)

# --------------------------------------------------------------------------------------------
# retry.backoff: the jitter spreads the wait over [½, 1] of the capped, doubling ceiling.


@pytest.mark.parametrize(
    ("attempt", "base", "cap", "jitter", "wait"),
    [
        (1, 2.0, 300.0, 0.0, 1.0),
        (1, 2.0, 300.0, 1.0, 2.0),
        (1, 2.0, 300.0, 0.5, 1.5),
        (0, 2.0, 300.0, 1.0, 2.0),  # no attempt yet counts as the first
        (-3, 2.0, 300.0, 1.0, 2.0),
        (2, 2.0, 300.0, 1.0, 4.0),
        (5, 2.0, 300.0, 0.0, 16.0),
        (9, 2.0, 300.0, 1.0, 300.0),  # 512 capped
        (9, 2.0, 300.0, 0.0, 150.0),
        (10**6, 2.0, 300.0, 1.0, 300.0),  # deletions retry without end: no overflow
        (3, 1.0, 10_000.0, 1.0, 4.0),
    ],
)
def test_backoff_table(attempt: int, base: float, cap: float, jitter: float, wait: float) -> None:
    assert retry.backoff(attempt, base, cap, jitter) == pytest.approx(wait)


def test_backoff_grows_with_each_attempt_for_any_jitter() -> None:
    jitters = [0.0, 0.25, 0.5, 0.75, 1.0]
    for attempt, low, high in itertools.product(range(1, 20), jitters, jitters):
        # Two attempts on, the shortest wait is at least the longest one before (until the cap).
        assert retry.backoff(attempt + 2, 1.0, 10**9, low) >= retry.backoff(attempt, 1.0, 10**9, high)


# --------------------------------------------------------------------------------------------
# delivery.after_attempt: delivered, retried (now or by the sweep), or given up at the window.


@pytest.mark.parametrize(
    ("delivered", "age", "attempts", "jitter", "expected"),
    [
        (True, timedelta(0), 1, 0.5, delivery.Delivered()),
        (True, WINDOW * 2, 50, 0.5, delivery.Delivered()),  # a late success still counts
        (False, timedelta(0), 1, 0.0, delivery.Retry(NOW + timedelta(seconds=0.5), True)),
        (False, timedelta(0), 1, 1.0, delivery.Retry(NOW + timedelta(seconds=1), True)),
        (False, timedelta(0), 3, 1.0, delivery.Retry(NOW + timedelta(seconds=4), True)),
        # Past the dispatcher's horizon: the store keeps it for beat's sweep.
        (False, timedelta(0), 4, 1.0, delivery.Retry(NOW + timedelta(seconds=8), False)),
        (False, timedelta(hours=1), 60, 1.0, delivery.Retry(NOW + timedelta(minutes=5), False)),
        # The last attempt lands on the window's end, not past it.
        (False, WINDOW - timedelta(seconds=10), 60, 1.0, delivery.Retry(NOW + timedelta(seconds=10), False)),
        (False, WINDOW - timedelta(seconds=2), 60, 1.0, delivery.Retry(NOW + timedelta(seconds=2), True)),
        (False, WINDOW, 60, 0.5, delivery.Undelivered()),
        (False, WINDOW + timedelta(hours=1), 1, 0.5, delivery.Undelivered()),
    ],
)
def test_after_attempt_table(
    delivered: bool, age: timedelta, attempts: int, jitter: float, expected: delivery.Decision
) -> None:
    assert delivery.after_attempt(delivered, NOW - age, attempts, NOW, WINDOW, HORIZON, jitter) == expected


def test_a_retry_is_never_before_now_nor_past_the_window() -> None:
    for attempts, jitter, hours in itertools.product(range(1, 40), (0.0, 0.3, 1.0), (0, 1, 12, 23.99)):
        created = NOW - timedelta(hours=hours)
        decision = delivery.after_attempt(False, created, attempts, NOW, WINDOW, HORIZON, jitter)
        assert isinstance(decision, delivery.Retry)
        assert NOW < decision.at <= created + WINDOW
        assert decision.at - NOW <= timedelta(seconds=delivery.BACKOFF_MAX_SECONDS)
        assert decision.send_now == (decision.at <= HORIZON)


LIVE = NOW + timedelta(seconds=30)
LAPSED = NOW - timedelta(seconds=1)


@pytest.mark.parametrize(
    ("due_in", "token", "until", "claim", "may"),
    [
        (0.0, None, None, None, True),  # due, free
        (-60.0, None, None, None, True),
        (0.9, None, None, None, True),  # an ETA message a little early on a skewed host
        (1.5, None, None, None, False),  # not due yet
        (0.0, "other", LIVE, None, False),  # another run holds it
        (0.0, "other", LIVE, "mine", False),
        (0.0, "mine", LIVE, "mine", True),  # the message's own claim (a retry or the sweep's)
        (0.0, "", LIVE, "", False),  # an empty claim is no claim
        (0.0, "other", LAPSED, None, True),  # its holder died
        (0.0, "other", NOW, None, False),  # lapsing this very instant: still held
    ],
)
def test_may_try_table(
    due_in: float, token: str | None, until: datetime | None, claim: str | None, may: bool
) -> None:
    assert delivery.may_try(NOW + timedelta(seconds=due_in), token, until, claim, NOW) is may


# --------------------------------------------------------------------------------------------
# feeds: the event a poll sends, a mass loss, the next poll.

OUTCOMES = (None, "ok", "failed", "suspicious")


@pytest.mark.parametrize(("previous", "outcome"), list(itertools.product(OUTCOMES, OUTCOMES[1:])))
def test_feed_event_table(previous: str | None, outcome: str) -> None:
    expected = {
        ("ok", None): None,
        ("ok", "ok"): None,
        ("ok", "failed"): "feed.recovered",
        ("ok", "suspicious"): "feed.recovered",
        ("failed", "failed"): None,
        ("suspicious", "suspicious"): None,
    }.get((outcome, previous), f"feed.{outcome}")
    assert feeds.feed_event(previous, outcome) == expected


@pytest.mark.parametrize(
    ("live", "gone", "wanted", "force", "suspicious"),
    [
        (10, 10, 0, False, True),  # everything vanished
        (10, 6, 4, False, True),
        (10, 6, 5, False, False),  # half is left: a real change
        (10, 5, 0, False, False),  # not more than half of them gone
        (4, 4, 0, False, True),
        (3, 3, 0, False, False),  # a small feed may lose everything
        (10, 10, 0, True, False),  # --force accepts it
        (0, 0, 0, False, False),
        (10, 8, 20, False, False),  # replaced by more than before
    ],
)
def test_mass_loss_table(live: int, gone: int, wanted: int, force: bool, suspicious: bool) -> None:
    assert feeds.suspicious(live, gone, wanted, force) is suspicious


@pytest.mark.parametrize(
    ("scheduled", "max_age", "wait"),
    [
        (None, None, 300),
        (None, 60, 300),  # never sooner than the interval
        (None, 1800, 1800),
        (None, 604800, feeds.MAX_AGE_CAP_SECONDS),
        (NOW + timedelta(seconds=900), None, 900),  # beat already moved it further on
        (NOW - timedelta(seconds=900), None, 300),
    ],
)
def test_next_poll_table(scheduled: datetime | None, max_age: int | None, wait: int) -> None:
    assert feeds.next_poll(scheduled, NOW, 300, max_age) == NOW + timedelta(seconds=wait)


def span(start_in_hours: float, hours: float = 1.0) -> feeds.Span:
    start = NOW + timedelta(hours=start_in_hours)
    return start, start + timedelta(hours=hours)


def test_compare_books_new_rebooks_moved_keeps_unchanged_cancels_gone_and_forgets_ended() -> None:
    stored = {
        "same": span(5),
        "moved": span(3),
        "gone": span(4),
        "ended": span(-3),
        "running": span(-0.5),  # started, not over: still live
        "ends-now": span(-1),
    }
    wanted = {"late": span(9), "moved": span(3, 2), "same": span(5), "new": span(1), "running": span(-0.5)}
    plan = feeds.compare(stored, wanted, NOW)
    assert plan.live == {bid: stored[bid] for bid in ("same", "moved", "gone", "running")}
    assert plan.ended == ["ended", "ends-now"]
    assert plan.gone == ["gone"]
    assert plan.actions == [
        ("running", "unchanged"),
        ("new", "book"),
        ("moved", "rebook"),
        ("same", "unchanged"),
        ("late", "book"),
    ]


def test_compare_of_an_ended_occurrence_read_again_books_it_anew() -> None:
    plan = feeds.compare({"back": span(-2)}, {"back": span(-2)}, NOW)
    assert plan.live == {} and plan.ended == ["back"] and plan.gone == []
    assert plan.actions == [("back", "book")]
