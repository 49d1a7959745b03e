"""The benchmark's arithmetic: figures read off a sandbox record must count what happened."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from bench.common import Booked, lifecycle_figures, percentiles
from bench.run import creation_rate, throughput_median

T0 = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def at(seconds: float) -> str:
    return (T0 + timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")


def room(meeting_id: str, made: float, deleted: float | None) -> dict[str, Any]:
    return {
        "meeting_id": meeting_id,
        "created_at": at(made),
        "deleted_at": None if deleted is None else at(deleted),
    }


def test_lag_readiness_duplicates_and_leaks_come_from_the_record() -> None:
    bookings = [
        Booked("on-time", T0 + timedelta(seconds=100), T0 + timedelta(seconds=200)),
        Booked("late", T0 + timedelta(seconds=100), T0 + timedelta(seconds=200)),
        Booked("twice", T0 + timedelta(seconds=100), T0 + timedelta(seconds=200)),
        Booked("never", T0 + timedelta(seconds=100), T0 + timedelta(seconds=200)),
    ]
    rooms = {
        "on-time": [room("1", 80, 200.25)],
        "late": [room("2", 95, 207)],  # 7 s after its end: a leak at the 5 s grace
        "twice": [room("3", 81, 200.5), room("4", 82, None)],  # a duplicate, still live: a leak
    }
    calls = [{"method": "POST", "status": 201}] * 4 + [{"method": "DELETE", "status": 204}] * 3
    figures = lifecycle_figures(bookings, rooms, [], calls, lead_seconds=20, until=T0)

    assert figures["meetings"] == 4 and figures["rooms"] == 4
    assert figures["duplicates"] == 1 and figures["duplicate_bookings"][0]["booking_id"] == "twice"
    assert figures["leaks"] == 2
    assert {leak["booking_id"] for leak in figures["leaked_rooms"]} == {"late", "twice"}
    assert figures["missing"] == 1
    assert figures["deletion_lag_s"]["n"] == 3
    assert figures["deletion_lag_s"]["min"] == 0.25 and figures["deletion_lag_s"]["max"] == 7.0
    assert figures["ready_before_start_s"]["min"] == 5.0  # "late" was ready 5 s before its start
    assert figures["ready_before_start_s"]["lead_s"] == 20
    assert figures["calls_per_meeting"] == 7 / 4
    assert figures["calls_by_method"] == {"POST": 4, "DELETE": 3}


def test_percentiles_use_nearest_rank() -> None:
    p = percentiles([float(n) for n in range(1, 101)])
    assert (p["n"], p["min"], p["p50"], p["p95"], p["p99"], p["max"]) == (100, 1.0, 50.0, 95.0, 99.0, 100.0)
    assert percentiles([])["p50"] is None


def test_creation_rate_counts_only_rooms_made() -> None:
    calls = [{"method": "POST", "status": 201, "at": at(n * 0.01)} for n in range(101)]
    calls += [{"method": "POST", "status": 503, "at": at(0.5)}, {"method": "GET", "status": 200, "at": at(9)}]
    rate = creation_rate(calls)
    assert rate["created"] == 101
    assert rate["span_s"] == 1.0 and rate["per_s"] == 101.0


def test_a_throughput_row_quotes_the_median_run_and_keeps_every_run() -> None:
    shape = {"processes": 1, "concurrency": 16, "store": "SQLite", "memory_mib": {"worker1": 120.0}}
    runs = [
        {**shape, "per_s": 110.0, "steady_per_s": 112.0, "cpu_ms_per_creation": 9.5, "created": 2000},
        {**shape, "per_s": 135.0, "steady_per_s": 136.0, "cpu_ms_per_creation": 7.0, "created": 2000},
        {**shape, "per_s": 120.0, "steady_per_s": 125.0, "cpu_ms_per_creation": None, "created": 1990},
    ]
    row = throughput_median(runs)
    assert row["per_s"] == 120.0 and row["steady_per_s"] == 125.0
    assert row["cpu_ms_per_creation"] == 8.25  # a run without the figure is left out, not zero
    assert row["per_s_runs"] == [110.0, 135.0, 120.0]
    assert row["created"] == 1990 and row["store"] == "SQLite" and row["concurrency"] == 16


def test_burst_counts_messages_skips_and_dispatches_from_the_processes_logs() -> None:
    from bench.burst import count_lines

    at = "[2026-12-02 02:27:50,192: INFO/MainProcess]"
    lines = [
        f"{at} Task rooms.create_room[f80e5d75-bdca] received",
        f"{at} Task rooms.create_room[97d3bea4-1875] received",
        f"{at} Task rooms.create_room[97d3bea4-1875] succeeded in 0.01s: 'created'",
        f"{at} Task rooms.create_room[f80e5d75-bdca] succeeded in 0.002s: "
        "'skipped: claim already taken (duplicate delivery)'",
        f"{at} Task rooms.delete_room[78d5c7e7-ccb6] received",
        f"{at} Task rooms.delete_room[78d5c7e7-ccb6] succeeded in 0.1s: 'skipped: not due'",
        f"{at} Task rooms.delete_room[78d5c7e7-ccb6] raised expected: WherebyCallFailed('503')",
        f"{at} dispatched 1137 creations and 2 deletions",
        f"{at} recovered 3 creations and 0 deletions",
        f"{at} Task rooms.create_room[97d3bea4-1875] succeeded in 0.01s: "
        "'skipped: not due, or done, or running (a copy of this message)'",
        "[2026-12-02 02:29:14,333: WARNING/MainProcess] beat: recover-overdue-work (rooms.recover_overdue)"
        " skipped this tick: its previous run is still going after 2.0 s",
        f"{at} booking b-1: scheduled, room due at 10:00",
    ]
    counts = count_lines(lines)
    assert counts.received == {"rooms.create_room": 2, "rooms.delete_room": 1}
    assert counts.skipped_duplicate == {"rooms.create_room": 2}
    assert counts.skipped_other == {"rooms.delete_room": 1}
    assert counts.failed == {"rooms.delete_room": 1}
    assert counts.dispatched == {
        "dispatched creations": 1137,
        "dispatched deletions": 2,
        "recovered creations": 3,
        "recovered deletions": 0,
    }
    assert counts.dispatch_lines == 2
    assert counts.ticks_skipped == 1 and counts.levels == {"WARNING": 1}
