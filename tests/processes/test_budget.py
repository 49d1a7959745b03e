"""The shared point budget: a sliding window in the real Redis, and the service staying under it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta

import pytest

from tests.conftest import BROKER, apply_settings, call, clear_budget, iso, parse, soon, wait_for
from worker.adapters.budget import Budget, BudgetExhausted
from worker.devtools.sandbox import SandboxAdmin


@pytest.fixture
def fresh_keys() -> Iterator[str]:
    prefix = f"test-budget-{time.monotonic_ns()}"
    yield prefix
    spent = Budget(BROKER, 1, prefix=prefix)
    spent.client.delete(*spent.keys)


def test_spends_at_most_the_budget_and_says_how_long_to_wait(fresh_keys: str) -> None:
    budget = Budget(BROKER, 10, prefix=fresh_keys)
    budget.acquire("POST", 3)
    budget.acquire("POST", 3)
    with pytest.raises(BudgetExhausted) as refused:
        budget.acquire("POST", 3)  # 9 > 8: creations leave a fifth of the budget to deletions
    assert 59 < refused.value.retry_after <= 60
    budget.acquire("DELETE", 2)  # deletions may use the whole budget
    assert budget.spent() == 8
    with pytest.raises(BudgetExhausted):
        budget.acquire("DELETE", 3)


def test_every_worker_shares_one_window(fresh_keys: str) -> None:
    first, second = Budget(BROKER, 10, prefix=fresh_keys), Budget(BROKER, 10, prefix=fresh_keys)
    first.acquire("GET", 5)
    second.acquire("POST", 3)
    with pytest.raises(BudgetExhausted):
        second.acquire("GET", 1)  # 9 > 8: what the first worker spent counts for the second
    assert first.spent() == second.spent() == 8


def test_the_window_slides(fresh_keys: str) -> None:
    budget = Budget(BROKER, 5, prefix=fresh_keys, window_ms=400)
    budget.acquire("DELETE", 5)
    with pytest.raises(BudgetExhausted) as refused:
        budget.acquire("DELETE", 1)
    assert 0 < refused.value.retry_after <= 0.4
    time.sleep(refused.value.retry_after + 0.05)
    budget.acquire("DELETE", 5)


def test_a_pause_stops_every_worker_until_it_ends(fresh_keys: str) -> None:
    first = Budget(BROKER, 100, prefix=fresh_keys, head_start_ms=0)
    second = Budget(BROKER, 100, prefix=fresh_keys, head_start_ms=0)
    first.pause(0.5)
    with pytest.raises(BudgetExhausted) as refused:
        second.acquire("GET", 1)
    assert refused.value.retry_after <= 0.5
    assert "paused" in str(refused.value)
    time.sleep(0.6)
    second.acquire("GET", 1)


@pytest.mark.parametrize("points_per_minute", [100, 0])
def test_after_a_pause_deletions_go_first(fresh_keys: str, points_per_minute: int) -> None:
    budget = Budget(BROKER, points_per_minute, prefix=fresh_keys, head_start_ms=600)
    budget.pause(0.3)
    for method in ("DELETE", "POST"):
        with pytest.raises(BudgetExhausted) as refused:
            budget.acquire(method, 2)
        assert refused.value.retry_after <= (0.3 if method == "DELETE" else 0.9)
    time.sleep(0.35)
    budget.acquire("DELETE", 2)  # the pause is over for deletions ...
    with pytest.raises(BudgetExhausted) as refused:
        budget.acquire("POST", 3)  # ... while creations wait out the deletions' head start
    assert 0.1 < refused.value.retry_after <= 0.6
    time.sleep(refused.value.retry_after + 0.05)
    budget.acquire("POST", 3)


def test_with_no_deletion_waiting_creations_resume_when_the_pause_ends(fresh_keys: str) -> None:
    budget = Budget(BROKER, 100, prefix=fresh_keys, head_start_ms=5_000)
    budget.pause(0.3)
    with pytest.raises(BudgetExhausted) as refused:
        budget.acquire("POST", 3)
    assert refused.value.retry_after <= 0.3  # no deletion was held back: no head start to give
    time.sleep(0.35)
    budget.acquire("POST", 3)


def test_zero_turns_the_limiter_off(fresh_keys: str) -> None:
    budget = Budget(BROKER, 0, prefix=fresh_keys)
    for _ in range(100):
        budget.acquire("POST", 3)
    assert budget.spent() == 0


@pytest.mark.usefixtures("system")
def test_the_service_stays_under_the_budget_instead_of_meeting_429s(sandbox: SandboxAdmin) -> None:
    sandbox.set_faults(points_per_minute=10)
    apply_settings(ROOMKEEPER_API_POINTS_PER_MINUTE="10")
    try:
        for n in range(3):
            start = soon(1)
            call("rooms.schedule_meeting", booking_id=f"budget-{n}", start=iso(start), end=iso(soon(600)))
        wait_for(lambda: len([c for c in sandbox.calls() if c["method"] == "POST"]) == 2)
        waiting = wait_for(
            lambda: [
                v
                for n in range(3)
                if (v := call("rooms.get_meeting", booking_id=f"budget-{n}"))["last_error"]
            ]
        )
        assert len(waiting) == 1
        assert waiting[0]["state"] == "creating"
        assert "point budget spent" in waiting[0]["last_error"]
        time.sleep(1)
        assert [c["status"] for c in sandbox.calls()] == [201, 201]  # no 429 ever reached Whereby
    finally:
        apply_settings(ROOMKEEPER_API_POINTS_PER_MINUTE="0")
        clear_budget()


@pytest.mark.usefixtures("system")
def test_a_429_pauses_every_worker_until_retry_after(sandbox: SandboxAdmin) -> None:
    apply_settings(ROOMKEEPER_API_POINTS_PER_MINUTE="100")
    try:
        sandbox.script({"method": "POST", "action": "rate_limit", "retry_after": 3})
        call("rooms.schedule_meeting", booking_id="paused-1", start=iso(soon(0.5)), end=iso(soon(600)))
        limited = wait_for(lambda: [c for c in sandbox.calls() if c["status"] == 429])[0]
        call("rooms.schedule_meeting", booking_id="paused-2", start=iso(soon(0.5)), end=iso(soon(600)))
        wait_for(
            lambda: all(
                call("rooms.get_meeting", booking_id=b)["state"] == "ready" for b in ("paused-1", "paused-2")
            ),
            timeout=20,
        )
        later = [c for c in sandbox.calls() if c["seq"] > limited["seq"]]
        assert later and all(parse(c["at"]) - parse(limited["at"]) >= timedelta(seconds=3) for c in later)
    finally:
        apply_settings(ROOMKEEPER_API_POINTS_PER_MINUTE="0")
        clear_budget()
